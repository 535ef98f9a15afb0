"""A run mirror's sync over many objects, listed in small pages and read in small batches, against
a real S3-compatible server (moto's server mode in its own process): the same mirror as one page
and one batch give, and a sync where nothing changed reads no marker and fetches no file
(docs/architecture.md, "Locations")."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import audit.remote
import audit.run_mirror
from audit.store import RunStore
from helpers import s3, s3_bucket

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from object_store_sync import put_tree, run_tree  # noqa: E402 - the benchmark's run-like tree

BUCKET = "memaudit-sync"
URI = f"s3://{BUCKET}/model=m/checkpoint=c/run=r"
SHARDS = 25  # per table: 5 tables -> 253 objects


@pytest.fixture(scope="module")
def bucket() -> Iterator[dict[str, Any]]:
    """The run-like tree in a bucket, with what a sync must not adopt: a writer's temporary file,
    the lease, a shard without its marker, a marker whose shard has another size."""
    with s3_bucket(BUCKET) as env:
        objects = run_tree(SHARDS, shard_bytes=64)
        objects["samples/.shard-00001.parquet.tmp-1-abcd"] = b"partial"
        objects[".memaudit-lease.json"] = b"{}"
        del objects["embeddings/_markers/shard-00002.json"]  # its writer died before the marker
        objects["matches/shard-00003.parquet"] = b"replaced by another size"
        put_tree(URI, objects)
        yield {"env": env, "objects": objects}


def _expected(objects: dict[str, bytes]) -> dict[str, bytes]:
    """What the mirror must hold: every object but temporaries and the lease, a shard only with a
    marker that has its size (and that marker only then)."""
    kept = {}
    for rel, data in objects.items():
        if audit.remote.is_temporary(rel):
            continue
        if rel.endswith(".parquet") and "/shard-" in rel:
            table, name = rel.split("/")
            marker = objects.get(f"{table}/_markers/{name.removesuffix('.parquet')}.json")
            if marker is None or f'"bytes": {len(data)},' not in marker.decode():
                continue
        if "/_markers/" in rel:
            table, _, name = rel.split("/")
            shard = objects[f"{table}/{name.removesuffix('.json')}.parquet"]
            if f'"bytes": {len(shard)},' not in data.decode():
                continue
        kept[rel] = data
    return kept


def _mirror_files(root: Path) -> dict[str, str]:
    """Every file of a mirror but its own bookkeeping: relative path -> sha256."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and p.name != audit.remote.PULLED}


def _counting(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count, on this store's real RemoteFolder, listing requests, markers read and files fetched."""
    remote, counts = store.mirror.remote, {"list_requests": 0, "read_calls": 0, "markers_read": 0, "fetched": 0}
    real_call, real_read_many = remote.fs.call_s3, remote.read_many
    real_download, real_download_many = remote.download, remote.download_many

    def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        counts["list_requests"] += method == "list_objects_v2"
        return real_call(method, *args, **kwargs)

    def read_many(rels: list[str]) -> dict[str, bytes]:
        counts["read_calls"] += 1
        counts["markers_read"] += len(rels)
        return real_read_many(rels)

    def download(rel: str, local: Path) -> None:
        counts["fetched"] += 1
        real_download(rel, local)

    def download_many(pairs: list[tuple[str, Path]]) -> None:
        counts["fetched"] += len(pairs)
        real_download_many(pairs)

    monkeypatch.setattr(remote.fs, "call_s3", call_s3)
    for name, wrapper in [("read_many", read_many), ("download", download), ("download_many", download_many)]:
        monkeypatch.setattr(remote, name, wrapper)
    return counts


def test_small_pages_and_batches_give_the_same_mirror_and_a_no_op_sync_reads_nothing(
        bucket: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = bucket["objects"]
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "one-page"))
    whole = RunStore(URI)
    whole.sync()  # every object in one listing page, every marker in one batch
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in _expected(objects).items()}
    assert _mirror_files(whole.path) == expected

    monkeypatch.setattr(audit.remote, "LIST_PAGE", 7)
    monkeypatch.setattr(audit.run_mirror, "BATCH", 16)
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "paged"))
    paged = RunStore(URI)
    counts = _counting(paged, monkeypatch)
    markers = sum("/_markers/" in rel for rel in objects)
    adopted = sum("/_markers/" in rel for rel in expected)
    assert paged.sync() == len(expected) - adopted  # every shard and other file fetched, markers written
    assert _mirror_files(paged.path) == expected
    assert (paged.path / audit.remote.PULLED).read_bytes() == (whole.path / audit.remote.PULLED).read_bytes()
    assert counts["list_requests"] == -(-len(objects) // 7)
    assert counts["markers_read"] == markers and counts["read_calls"] == -(-markers // 16)
    assert not paged.is_complete("embeddings", "shard-00002") and not paged.is_complete("matches", "shard-00003")
    assert paged.is_complete("samples", "shard-00024")

    counts.update(read_calls=0, markers_read=0, fetched=0, list_requests=0)
    assert paged.sync() == 0  # nothing changed: listed again, nothing fetched, no adopted marker read
    rejected = markers - adopted  # matches/shard-00003's marker, not adopted: read again, as every sync does
    assert counts == {"list_requests": -(-len(objects) // 7), "read_calls": 1, "markers_read": rejected, "fetched": 0}

    client = s3(bucket["env"])
    client.rm(f"{URI[5:]}/neighbors/_markers/shard-00005.json")  # invalidated by another node
    (paged.path / "samples/shard-00006.parquet").unlink()  # lost locally: fetched again, its marker not read
    counts.update(markers_read=0)
    assert paged.sync() == 1 and counts["markers_read"] == rejected
    assert not paged.is_complete("neighbors", "shard-00005") and paged.is_complete("samples", "shard-00006")
    assert sorted(paged.mirror.remote.inventory("report")) == ["report/index.html"]  # relative to the run
