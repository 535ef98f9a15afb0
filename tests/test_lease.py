"""The lease on a folder (audit.lease): one holder, its refusal naming the holder, waiting, takeover
of a dead holder's lease (a SIGKILLed process; an object-store record past its TTL), and a commit
refused once the lease is gone. Object-store leases run against a real S3-compatible server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from audit.errors import InputError
from audit.files import LEASE_FILE
from audit.lease import Lease, LeaseHeld, LeaseLost, holder
from audit.location import Location
from audit.store import RunStore
from helpers import s3, s3_bucket

BUCKET = "memaudit-lease"
SCHEMA = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("error", pa.string())])


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    with s3_bucket(BUCKET) as env:
        yield env


def _commit(store: RunStore, shard: str) -> dict:
    with store.open_shard("samples", shard, SCHEMA) as writer:
        writer.write({"sample_id": ["a-00000"], "status": ["ok"], "error": [None]})
        return writer.commit()


def test_a_held_local_lease_is_refused_naming_its_holder_and_free_once_released(tmp_path: Path) -> None:
    with Lease(tmp_path, "run", command="memaudit run").acquire() as first:
        with pytest.raises(LeaseHeld) as refused:
            Lease(tmp_path, "run").acquire()
        message = str(refused.value)
        assert f"process {os.getpid()}" in message and "memaudit run" in message and "--wait" in message
        assert "started 20" in message and "last renewed" in message
        assert holder(tmp_path)["token"] == first.token  # a reader sees the live holder, without blocking
    assert holder(tmp_path) is None
    with Lease(tmp_path, "run").acquire() as again:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == again.token


def test_a_waiting_driver_gets_the_lease_when_its_holder_releases_it(tmp_path: Path) -> None:
    first = Lease(tmp_path, "run").acquire()
    threading.Timer(1.0, first.release).start()
    began = time.monotonic()
    with Lease(tmp_path, "run").acquire(wait=True):
        assert time.monotonic() - began >= 0.9


def test_a_killed_holders_local_lease_is_taken_over_at_once_and_logged(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    code = (f"import sys, time; from audit.lease import Lease; Lease({str(tmp_path)!r}, 'run').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld, match=f"process {proc.pid}"):
        Lease(tmp_path, "run").acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    caplog.set_level(logging.WARNING, logger="audit.lease")
    with Lease(tmp_path, "run").acquire():
        pass
    assert f"took over the lease of host {os.uname().nodename}, process {proc.pid}" in caplog.text


def test_a_commit_under_a_lease_taken_over_publishes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lease = Lease(run, "run").acquire()
    store = RunStore(run, lease.check)
    marker = _commit(store, "shard-00000")
    assert marker["lease"] == lease.token  # the marker names the lease it was committed under
    lease.release()
    with Lease(run, "run").acquire():  # another driver now
        with pytest.raises(LeaseLost, match="taken over"):
            _commit(store, "shard-00001")
        with pytest.raises(LeaseLost):
            store.write_json({"x": 1}, "run.json")
    assert not store.shard_path("samples", "shard-00001").exists()
    assert store.read_marker("samples", "shard-00001") is None
    assert not [p for p in (run / "samples").iterdir() if ".tmp-" in p.name]  # the temporary file is gone


def test_a_run_root_that_is_a_file_is_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.write_text("not a folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        Location.of(root).check_writable("run.root")
    with pytest.raises(InputError, match="is a file, not a folder"):
        Location.of(root / "below").check_writable("run.root")


def test_a_bucket_lease_is_held_once_and_taken_over_after_its_ttl(server: dict,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    where = f"s3://{BUCKET}/runs/run=a"
    holder_lease = Lease(where, "run", ttl_s=6.0).acquire()
    holder_lease._stop.set()  # its renewals stop, as when the holder dies
    with pytest.raises(LeaseHeld, match="last renewed"):
        Lease(where, "run", ttl_s=6.0).acquire()
    store = RunStore(where, holder_lease.check)
    time.sleep(6.5)  # a TTL a loaded 2-core machine renews within
    with pytest.raises(LeaseLost, match="not renewed"):  # expired: its holder's workers may not publish
        _commit(store, "shard-00000")
    caplog.set_level(logging.WARNING, logger="audit.lease")
    with Lease(where, "run", ttl_s=6.0).acquire() as taker:
        assert f"took over the lease of host {os.uname().nodename}, process {os.getpid()}" in caplog.text
        with pytest.raises(LeaseLost, match="taken over"):
            _commit(store, "shard-00000")
        assert _commit(RunStore(where, taker.check), "shard-00000")["lease"] == taker.token
    assert s3(server).exists(f"{BUCKET}/runs/run=a/samples/_markers/shard-00000.json")
    assert not s3(server).exists(f"{BUCKET}/runs/run=a/{LEASE_FILE}")  # released: removed


def test_a_paused_bucket_holder_gives_its_lease_up_without_writing(server: dict) -> None:
    where = f"s3://{BUCKET}/runs/run=paused"
    lease = Lease(where, "run", ttl_s=2.0).acquire()
    lease.renewed_at -= 1.5  # as if the process had been stopped for 1.5 s: past half the TTL
    time.sleep(0.5)  # the next renewal tick finds it
    with pytest.raises(LeaseLost, match="could not renew"):
        lease.ensure()
    record = json.loads(s3(server).cat(f"{BUCKET}/runs/run=paused/{LEASE_FILE}"))
    assert record["renewed_at"] == pytest.approx(lease.started_at)  # it wrote nothing after the pause
    lease.release()


def test_run_root_and_reference_folders_that_are_files_exit_2_before_any_work(
        tiny_checkpoint: Path, prompt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from audit.cli import main
    from helpers import write_config

    root = tmp_path / "runs"
    root.write_text("a file")
    cfg = write_config(tmp_path / "audit.yaml", run={"root": str(root)}, model={"path": str(tiny_checkpoint)},
                       prompts={"source": str(prompt_file)})
    assert main(["run", str(cfg)]) == 2
    assert f"run.root {root}: {root} is a file, not a folder" in capsys.readouterr().err
    assert root.read_text() == "a file"
    for argv in (["reference", "index", str(root)], ["reference", "embed", str(tmp_path), str(root)]):
        assert main(argv) == 2
        assert f"{root} is a file, not a folder" in capsys.readouterr().err


def test_a_released_record_copied_into_a_bucket_does_not_hold_it(server: dict, tmp_path: Path) -> None:
    with Lease(tmp_path, "reference folder").acquire():
        pass  # a local folder keeps its released record; copied into a bucket, it must not block a writer
    s3(server).put(str(tmp_path / LEASE_FILE), f"{BUCKET}/copied/{LEASE_FILE}")
    began = time.monotonic()
    with Lease(f"s3://{BUCKET}/copied", "reference folder").acquire() as lease:
        assert time.monotonic() - began < 5
        assert holder(f"s3://{BUCKET}/copied")["token"] == lease.token
