"""Concurrent drivers of one folder, as real ``memaudit`` processes on one local Ray (and, for
object-store runs, a real S3-compatible server): the pairs run/run, run/report, run/watch,
index/index and embed/index; a holder SIGKILLed (taken over at once on a file system, after the
TTL in a bucket); a holder paused past the TTL that can no longer publish.

A holder is paused with SIGSTOP where a test needs it to keep its lease while another driver tries
(a stopped process keeps its ``flock``); its Ray workers keep running meanwhile. Every shard marker
names the lease it was committed under, which is how "written once, by whom" is counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.cli import main
from audit.files import LEASE_FILE
from audit.lease import holder
from helpers import PROMPTS, payload, s3, s3_bucket, write_config

TABLES = ("samples", "embeddings", "prompt_scores", "matches")
N_SHARDS = 4


def _config(folder: Path, checkpoint: Path, root: str, **compute: object) -> Path:
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:8]) + "\n", encoding="utf-8")
    return write_config(
        folder / "audit.yaml",
        run={"root": root, "seed": 0, "model_name": "tiny"},
        model={"path": str(checkpoint)},
        prompts={"source": str(prompts)},
        generation={"samples_per_prompt": 4, "steps": 8, "prompts_per_shard": 2},
        compute={"batch_size": 8, "num_workers": 1, "cpus_per_worker": 1, **compute},
    )


class Driver:
    """One ``memaudit`` process, its output in files (a pipe could fill and block it)."""

    def __init__(self, folder: Path, name: str, *argv: str) -> None:
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "audit.cli", *argv], stdout=out, stderr=err,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def _until(condition, timeout: float = 180, every: float = 0.02):  # noqa: ANN001, ANN202 - a polling helper
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out waiting")


def _run_folder(root: Path) -> Path | None:
    found = sorted(root.glob("model=*/checkpoint=*/run=*"))
    return found[0] if found else None


def _live_holder(folder: Path | None) -> dict | None:
    if folder is None or not (folder / LEASE_FILE).is_file():
        return None
    record = holder(folder)
    return record if record and record.get("token") else None


def _leases(run: Path) -> dict[str, set[str]]:
    """The lease each shard was committed under, per table."""
    return {t: {json.loads(p.read_text()).get("lease") for p in (run / t / "_markers").glob("*.json")}
            for t in TABLES if (run / t / "_markers").is_dir()}


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    with s3_bucket("memaudit-leases") as env:
        yield env


@pytest.fixture(scope="module")
def ray_local(server: dict[str, str]) -> Iterator[str]:
    """This module's local Ray, started once the S3 server's credentials are in the environment
    (Ray workers take the environment of the cluster they run in, not the driver's)."""
    import ray

    from audit.pipeline import connect

    connect(None, num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_run(ray_local: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same config run alone, uninterrupted: what every concurrent run must equal byte for byte."""
    folder = tmp_path_factory.mktemp("alone")
    assert main(["-q", "run", str(_config(folder, tiny_checkpoint, str(folder / "runs"))), "--address", ray_local,
                 "--no-report"]) == 0
    return _run_folder(folder / "runs")


def test_two_runs_started_together_one_writes_one_exits_6_and_a_waiting_one_resumes_as_a_no_op(
        ray_local: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(_config(tmp_path, tiny_checkpoint, str(tmp_path / "runs")))
    first = Driver(tmp_path, "a", "run", cfg, "--address", ray_local)
    second = Driver(tmp_path, "b", "run", cfg, "--address", ray_local)
    loser = _until(lambda: next((d for d in (first, second) if d.proc.poll() is not None), None))
    winner = second if loser is first else first
    assert loser.finish() == 6, loser.output()
    assert "is being written by another driver" in loser.output() and f"process {winner.pid}" in loser.output()
    run = _run_folder(tmp_path / "runs")
    record = _live_holder(run)
    assert record and record["process_id"] == winner.pid
    winner.signal(signal.SIGSTOP)  # keeps the lease (and its workers keep working) while the others try
    try:
        waiting = Driver(tmp_path, "c", "run", cfg, "--address", ray_local, "--wait")
        _until(lambda: "waiting for the lease held by" in waiting.output())
        assert waiting.proc.poll() is None
        # run/report: readers neither take the lease nor wait for it; they say the run is being written
        assert main(["verify", str(run)]) in (0, 5)
        assert main(["report", str(run)]) in (0, 2)  # 2: no prompt scores yet
        noted = capsys.readouterr().err
        assert noted.count(f"is being written now by host {os.uname().nodename}, process {winner.pid}") == 2
    finally:
        winner.signal(signal.SIGCONT)
    assert winner.finish() == 0, winner.output()
    assert waiting.finish() == 0, waiting.output()
    assert "samples: 0 written this time (0 shards), 4 of 4 shards already complete" in waiting.output()
    # every shard of every table was committed once, under the winner's lease; the waiting driver wrote none
    leases = _leases(run)
    assert leases and all(tokens == {record["token"]} for tokens in leases.values()), leases
    assert len(list((run / "samples" / "_markers").glob("*.json"))) == N_SHARDS
    assert main(["verify", str(run)]) == 0


@pytest.mark.slow  # ~80 s with the uninterrupted run it is compared with
def test_a_killed_drivers_lease_is_taken_over_at_once_and_its_run_completed_identically(
        ray_local: str, tiny_checkpoint: Path, tmp_path: Path, reference_run: Path) -> None:
    cfg = str(_config(tmp_path, tiny_checkpoint, str(tmp_path / "runs")))
    first = Driver(tmp_path, "a", "run", cfg, "--address", ray_local)
    run = _until(lambda: _run_folder(tmp_path / "runs"))
    _until(lambda: list((run / "samples" / "_markers").glob("*.json")) or first.proc.poll() is not None)
    first.signal(signal.SIGKILL)  # its Ray workers die with it (they are owned by the driver)
    first.finish()
    done = len(list((run / "samples" / "_markers").glob("*.json")))
    assert 0 < done < N_SHARDS, "kill the driver between its first and last shard"
    second = Driver(tmp_path, "b", "run", cfg, "--address", ray_local)
    assert second.finish() == 0, second.output()
    assert f"took over the lease of host {os.uname().nodename}, process {first.pid}" in second.output()
    assert f"{N_SHARDS - done} shards" in second.output()  # only what the killed driver had not finished
    assert payload(run) == payload(reference_run)
    assert main(["verify", str(run)]) == 0


def test_a_reference_folder_has_one_writer_embed_index_and_index_index(
        ray_local: str, tmp_path: Path) -> None:
    from audit.reference.training_set import write_shipped_training_set

    out = tmp_path / "reference"
    source = write_shipped_training_set(tmp_path / "source")
    embed = Driver(tmp_path, "embed", "reference", "embed", str(source), str(out), "--address", ray_local)
    _until(lambda: _live_holder(out) or embed.proc.poll() is not None, every=0.005)
    embed.signal(signal.SIGSTOP)
    try:
        assert embed.proc.poll() is None, embed.output()
        index = Driver(tmp_path, "index-early", "reference", "index", str(out))
        assert index.finish() == 6, index.output()
        assert f"process {embed.pid} (memaudit reference embed)" in index.output()
    finally:
        embed.signal(signal.SIGCONT)
    assert embed.finish() == 0, embed.output()
    # index/index: the first holds the folder (paused as soon as it has the lease), the second is refused
    first = Driver(tmp_path, "index-a", "reference", "index", str(out))
    _until(lambda: _live_holder(out) or first.proc.poll() is not None, every=0.002)
    first.signal(signal.SIGSTOP)
    try:
        assert first.proc.poll() is None, "the first index finished before it could be paused"
        second = Driver(tmp_path, "index-b", "reference", "index", str(out))
        assert second.finish() == 6, second.output()
        assert f"process {first.pid} (memaudit reference index)" in second.output()
        waiting = Driver(tmp_path, "index-c", "reference", "index", str(out), "--wait")
        _until(lambda: "waiting for the lease held by" in waiting.output())
    finally:
        first.signal(signal.SIGCONT)
    assert first.finish() == 0, first.output()
    assert waiting.finish() == 0, waiting.output()
    assert (out / "index" / "manifest.json").is_file()


@pytest.mark.slow  # ~60 s: a watched checkpoint's audit beside a manual run of it, both ways
def test_watch_and_run_on_one_checkpoint_never_both_write_it(ray_local: str, tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    import shutil

    from audit.testbed.architectures import TINY, build_pipeline, save_pipeline

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoint, checkpoints / "step-1")
    save_pipeline(build_pipeline(TINY, seed=1), checkpoints / "step-2")  # other weights: another run
    cfg = str(_config(tmp_path, tiny_checkpoint, str(tmp_path / "runs")))

    def manual_run(name: str, step: str) -> Driver:
        return Driver(tmp_path, name, "run", cfg, "--address", ray_local, "--set",
                      f"model.path={checkpoints / step}", "--set", "run.model_name=checkpoints")

    # a manual run of step-1 holds its run's lease: watch leaves that checkpoint to it
    manual = manual_run("manual-1", "step-1")
    first = _until(lambda: _run_folder(tmp_path / "runs"))
    _until(lambda: _live_holder(first))
    manual.signal(signal.SIGSTOP)
    try:
        watch = Driver(tmp_path, "watch-1", "watch", str(checkpoints / "step-1"), cfg, "--model", "checkpoints",
                       "--address", ray_local)
        assert watch.finish() == 0, watch.output()
        assert "0 audited now, 0 already audited, 1 being audited elsewhere" in watch.output()
    finally:
        manual.signal(signal.SIGCONT)
    assert manual.finish() == 0, manual.output()
    # watch holds the run of step-2: a manual run of it exits 6 naming the watch
    watch = Driver(tmp_path, "watch-2", "watch", str(checkpoints), cfg, "--model", "checkpoints", "--address",
                   ray_local)
    second = _until(lambda: next((f for f in _runs(tmp_path / "runs") if f != first and _live_holder(f)), None))
    watch.signal(signal.SIGSTOP)
    try:
        refused = manual_run("manual-2", "step-2")
        assert refused.finish() == 6, refused.output()
        assert f"process {watch.pid} (memaudit watch)" in refused.output()
    finally:
        watch.signal(signal.SIGCONT)
    assert watch.finish() == 0, watch.output()
    assert "2 audited now, 0 already audited" in watch.output()  # step-1: the manual run's, resumed as a no-op
    for run in (first, second):  # each shard committed once, by one driver
        tokens = _leases(run)
        assert tokens and all(len(t) == 1 for t in tokens.values()), tokens
    assert _leases(first)["samples"] != _leases(second)["samples"]


def _runs(root: Path) -> list[Path]:
    return sorted(root.glob("model=*/checkpoint=*/run=*"))


def _bucket_markers(client, prefix: str) -> dict[str, dict]:  # noqa: ANN001 - an s3fs file system
    return {path: json.loads(client.cat(path)) for path in client.glob(f"{prefix}/*/*/*/samples/_markers/*.json")}


def _mirrored_markers(root: str) -> list[Path]:
    """Samples markers in this machine's mirror of a bucket run root: a worker writes one only after
    the shard and its marker are in the bucket (polling the mirror is fast, listing the bucket not)."""
    from audit.location import Location

    return list(Location.of(f"s3://memaudit-leases/{root}").local.glob("*/*/*/samples/_markers/*.json"))


def _bucket_run(driver: Driver) -> str:
    return next(line.removeprefix("run: ") for line in driver.out.read_text().splitlines() if line.startswith("run: "))


@pytest.mark.slow  # ~80 s: two bucket runs, each interrupted and completed by another driver
def test_a_bucket_run_is_taken_over_after_the_ttl_and_a_paused_holder_cannot_publish(
        server: dict, ray_local: str, tiny_checkpoint: Path, tmp_path: Path, reference_run: Path) -> None:
    from audit.location import Location

    client = s3(server)
    ttl = 8.0
    # killed: refused while its lease is fresh, taken over once the lease expired
    cfg = str(_config(tmp_path, tiny_checkpoint, "s3://memaudit-leases/killed", lease_ttl_s=ttl))
    first = Driver(tmp_path, "a", "run", cfg, "--address", ray_local)
    _until(lambda: _mirrored_markers("killed") or first.proc.poll() is not None)
    first.signal(signal.SIGKILL)
    first.finish()
    early = Driver(tmp_path, "b", "run", cfg, "--address", ray_local)
    assert early.finish() == 6, early.output()
    assert f"process {first.pid} (memaudit run)" in early.output()
    time.sleep(ttl)
    late = Driver(tmp_path, "c", "run", cfg, "--address", ray_local)
    assert late.finish() == 0, late.output()
    assert f"took over the lease of host {os.uname().nodename}, process {first.pid}" in late.output()
    assert payload(Location.of(_bucket_run(late)).local) == payload(reference_run)
    assert main(["verify", _bucket_run(late)]) == 0
    # paused past the TTL: its workers publish nothing once its lease expired; resumed, it exits 6
    cfg = str(_config(tmp_path, tiny_checkpoint, "s3://memaudit-leases/paused", lease_ttl_s=ttl))
    paused = Driver(tmp_path, "p", "run", cfg, "--address", ray_local)
    _until(lambda: _mirrored_markers("paused") or paused.proc.poll() is not None)
    lease_object = client.glob(f"memaudit-leases/paused/*/*/*/{LEASE_FILE}")[0]
    paused_token = json.loads(client.cat(lease_object))["token"]
    paused.signal(signal.SIGSTOP)
    expired_at = time.time() + ttl  # renewed at most a tenth of the TTL before the pause
    try:
        time.sleep(ttl + 1)
        taker = Driver(tmp_path, "t", "run", cfg, "--address", ray_local)
        assert taker.finish() == 0, taker.output()
        assert f"took over the lease of host {os.uname().nodename}, process {paused.pid}" in taker.output()
    finally:
        paused.signal(signal.SIGCONT)
    assert paused.finish() == 6, paused.output()
    assert "lease" in paused.err.read_text().splitlines()[-1]
    client.invalidate_cache()
    assert not client.exists(lease_object)  # the taker released its lease; the paused driver wrote none back
    markers = list(_bucket_markers(client, "memaudit-leases/paused").values())
    assert len(markers) == N_SHARDS
    by_paused = [m for m in markers if m["lease"] == paused_token]
    assert by_paused and len(by_paused) < N_SHARDS
    assert all(m["finished_at"] <= expired_at for m in by_paused)  # nothing after its lease expired
    assert len({m["lease"] for m in markers} - {paused_token}) == 1  # the rest: the taker's
    assert payload(Location.of(_bucket_run(taker)).local) == payload(reference_run)
    assert main(["verify", _bucket_run(taker)]) == 0
