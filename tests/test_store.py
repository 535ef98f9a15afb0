"""Atomic shard files, completion markers written last, and batch driving."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.batching import batches, run_batches
from audit.files import write_bytes_atomic
from audit.store import RunStore, run_location

SCHEMA = pa.schema([pa.field("sample_id", pa.string()), pa.field("status", pa.string()),
                    pa.field("error", pa.string()), pa.field("value", pa.int64())])


def _rows(start: int, n: int, status: str = "ok") -> dict[str, np.ndarray]:
    return {
        "sample_id": np.array([f"s{i:03d}" for i in range(start, start + n)], dtype=object),
        "status": np.array([status] * n, dtype=object),
        "error": np.array([None if status == "ok" else "boom"] * n, dtype=object),
        "value": np.arange(start, start + n),
    }


def test_run_dir_is_hive_style(tmp_path: Path) -> None:
    assert run_location(tmp_path, "sd15", "abc", "r1").local == tmp_path / "model=sd15" / "checkpoint=abc" / "run=r1"


def test_commit_publishes_file_then_marker(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with store.open_shard("samples", "shard-00000", SCHEMA) as writer:
        writer.write(_rows(0, 3))
        assert not store.shard_path("samples", "shard-00000").exists()
        assert not store.is_complete("samples", "shard-00000")
        writer.write(_rows(3, 2, status="error"))
        marker = writer.commit(device="cpu")
    assert store.is_complete("samples", "shard-00000")
    assert marker["rows"] == 5 and marker["status_counts"] == {"ok": 3, "error": 2}
    assert marker["first_error"] == "boom" and marker["device"] == "cpu"
    table = pq.read_table(store.shard_path("samples", "shard-00000"))
    assert table.column("value").to_pylist() == [0, 1, 2, 3, 4]
    assert store.status_totals("samples", ["shard-00000", "shard-00001"]) == {"complete_shards": 1, "ok": 3, "error": 2}
    assert not list((tmp_path / "samples").glob(".*"))


def test_exception_leaves_no_file_no_marker_no_tmp(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.open_shard("samples", "shard-00001", SCHEMA) as writer:
            writer.write(_rows(0, 3))
            raise RuntimeError("disk full")
    assert not store.shard_path("samples", "shard-00001").exists()
    assert store.read_marker("samples", "shard-00001") is None
    assert list((tmp_path / "samples").iterdir()) == []


def test_leaving_without_commit_is_not_complete(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with store.open_shard("samples", "shard-00002", SCHEMA) as writer:
        writer.write(_rows(0, 1))
    assert not store.is_complete("samples", "shard-00002")
    assert list((tmp_path / "samples").iterdir()) == []


def test_marker_without_matching_file_is_incomplete(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with store.open_shard("samples", "shard-00000", SCHEMA) as writer:
        writer.write(_rows(0, 3))
        writer.commit()
    path = store.shard_path("samples", "shard-00000")
    path.write_bytes(path.read_bytes()[:-10])  # truncated behind our back
    assert not store.is_complete("samples", "shard-00000")
    path.unlink()
    assert not store.is_complete("samples", "shard-00000")
    store.invalidate("samples", "shard-00000")
    assert store.read_marker("samples", "shard-00000") is None


def test_row_groups_are_bounded(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    writer = store.open_shard("samples", "shard-00000", SCHEMA)
    writer.row_group_bytes = 1  # flush every write
    with writer:
        for start in range(0, 10, 2):
            writer.write(_rows(start, 2))
        writer.commit()
    assert pq.ParquetFile(store.shard_path("samples", "shard-00000")).num_row_groups == 5


def test_atomic_json_and_stale_tmp_cleanup(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_json({"a": 1})
    assert store.read_json() == {"a": 1}
    write_bytes_atomic(tmp_path / "x" / "f.bin", b"abc")
    assert (tmp_path / "x" / "f.bin").read_bytes() == b"abc"
    (tmp_path / "samples").mkdir()
    stale = tmp_path / "samples" / ".shard-00000.parquet.tmp-1-deadbeef"
    fresh = tmp_path / "samples" / ".shard-00001.parquet.tmp-1-cafebabe"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 2 * 86_400
    os.utime(stale, (old, old))
    assert store.remove_stale_tmp("samples") == 1
    assert not stale.exists() and fresh.exists()


class _TwoPhase:
    """A deterministic two-phase stage that records which thread ran each phase."""

    def __init__(self) -> None:
        self.threads: dict[str, set[str]] = {"generate": set(), "encode": set()}

    def generate(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        self.threads["generate"].add(threading.current_thread().name)
        return batch["value"] * 10

    def encode(self, batch: dict[str, np.ndarray], raw: np.ndarray) -> dict[str, np.ndarray]:
        self.threads["encode"].add(threading.current_thread().name)
        if (raw == 70).any():
            raise ValueError("encode failed on row 7")
        return {**batch, "value": raw}


def test_run_batches_keeps_order_and_overlaps_phases() -> None:
    rows = _rows(0, 7)
    out: list[dict[str, np.ndarray]] = []
    stage = _TwoPhase()
    run_batches(stage, rows, out.append, batch_size=3)
    assert [len(b["value"]) for b in out] == [3, 3, 1]
    assert np.concatenate([b["value"] for b in out]).tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert stage.threads["generate"] == {threading.current_thread().name}
    assert all(name.startswith("memaudit-encode") for name in stage.threads["encode"])
    plain: list[dict[str, np.ndarray]] = []
    run_batches(lambda b: b, rows, plain.append, batch_size=4)
    assert [len(b["value"]) for b in plain] == [4, 3]
    assert len(batches(rows, 10)) == 1


def test_run_batches_propagates_encode_errors() -> None:
    with pytest.raises(ValueError, match="row 7"):
        run_batches(_TwoPhase(), _rows(0, 9), lambda b: None, batch_size=2)


@pytest.mark.parametrize("room", [0, 8192, 32768])  # bytes left: none (the header fails), some (the rows fail)
def test_a_full_disk_leaves_no_file_no_marker_no_tmp_and_names_the_shard(tmp_path: Path, room: int) -> None:
    import errno
    import os

    from helpers import fill, small_disk

    with small_disk(tmp_path / "disk", "256k") as disk:
        store = RunStore(disk / "run")
        store.table_dir("samples").mkdir(parents=True)
        (store.table_dir("samples") / "_markers").mkdir()
        filler = fill(disk)
        os.truncate(filler, max(0, filler.stat().st_size - room))
        schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("payload", pa.binary())])
        rows = {"sample_id": [f"s{i}" for i in range(60)], "payload": [os.urandom(1000) for _ in range(60)]}
        with pytest.raises(OSError) as err:  # ~60 kB that do not compress
            with store.open_shard("samples", "shard-00001", schema) as writer:
                writer.write(rows)
                writer.commit()
        assert err.value.errno == errno.ENOSPC
        assert err.value.filename.endswith("shard-00001.parquet")
        assert store.read_marker("samples", "shard-00001") is None and not store.is_complete("samples", "shard-00001")
        assert not [p for p in store.table_dir("samples").rglob("*") if p.name.startswith(".")]
