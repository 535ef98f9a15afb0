"""Building faiss index shards over an embedding folder, with a JSON manifest.

Exact ``Flat`` up to ``reference.flat_max_vectors``; above it ``IVF{nlist},SQ8`` (8-bit scalar
codes, one byte per dimension), whose candidates are re-ranked at search time against the exact
float16 vectors of the folder itself (memory-mapped, see :mod:`audit.reference.vectors`). SQ8 was
chosen over PQ because on hard (near-equidistant) neighbors PQ's ranking needs tens of times
more re-ranked candidates for the same recall, which costs more than the scan it saves
(``benchmarks/knn_join.py``); for billions of vectors set e.g. ``IVF65536,PQ192x4fs`` with a
larger ``rerank``. Any faiss factory string may be configured.

A trainable index is trained once, on a seeded sample over the whole folder, and saved as
``trained.faiss``; every shard starts from that copy, so all shards share one coarse quantizer
and the training cost is paid once. Shards cover contiguous global row ranges; each is written
under a temporary name, renamed, and recorded in ``shard_{j}.json`` (a re-run skips finished
shards and the finished training); the manifest comes last.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from audit.config import ReferenceSection
from audit.errors import InputError
from audit.progress import Progress
from audit.reference.folder import FolderCheck, validate_folder
from audit.reference.vectors import VectorStore
from audit.files import atomic_file, save_npy_atomic, write_bytes_atomic, write_parquet_atomic

log = logging.getLogger(__name__)
INDEX_DIR = "index"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ADD_BLOCK = 65_536


def choose_factory(n_vectors: int, dim: int, section: ReferenceSection) -> str:
    """The configured factory string, or the default recipe for this many vectors."""
    if section.index_factory != "auto":
        return section.index_factory
    if n_vectors <= section.flat_max_vectors:
        return "Flat"
    nlist = int(min(65_536, max(256, 2 ** round(math.log2(4 * math.sqrt(n_vectors))))))
    return f"IVF{nlist},SQ8"


def is_exact(factory: str) -> bool:
    return factory.replace(" ", "") in {"Flat", "IDMap,Flat"}


def build_index(root: Path, section: ReferenceSection, out: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Validate ``root`` and build (or finish building) its index shards; returns the manifest."""
    out = out or root / INDEX_DIR
    check = validate_folder(root)
    included = check.total_rows - len(check.excluded)
    if included == 0:
        raise InputError(f"{root}: no usable embeddings ({len(check.excluded)} rows excluded as NaN/Inf/zero)")
    factory = choose_factory(included, check.dim, section)
    _check_factory(factory, check.dim)
    first_rows = np.cumsum([0] + [f.rows for f in check.files])[:-1].tolist()
    store = VectorStore([f.npy for f in check.files], first_rows)
    excluded_rows = np.array(sorted(int(first_rows[_pos(check, i)]) + r for i, r in check.excluded), dtype=np.int64)
    included_rows = np.setdiff1d(np.arange(check.total_rows, dtype=np.int64), excluded_rows, assume_unique=True)
    trained = _trained(out, factory, check.dim, store, included_rows, section, seed)
    shards = []
    starts = range(0, check.total_rows, section.vectors_per_shard)
    with Progress("index shards", "vector", check.total_rows, tasks=len(starts)) as progress:
        for j, start in enumerate(starts):
            end = min(start + section.vectors_per_shard, check.total_rows)
            shards.append(_build_shard(out, j, start, end, store, excluded_rows, factory, trained))
            progress.update(end - start)
    _write_exclusions(out, check, first_rows)
    manifest = {
        "format_version": FORMAT_VERSION,
        "embedding": {"model_id": check.model_id, "dim": check.dim, "dtype": check.dtype},
        "metric": "inner_product",
        "source": str(root.resolve()),
        "count": int(sum(s["vectors"] for s in shards)),
        "rows": check.total_rows,
        "excluded": len(check.excluded),
        "excluded_file": "excluded.parquet",
        "renormalised": check.renormalised_rows,
        "duplicate_keys": check.duplicate_keys,
        "factory": factory,
        "exact": is_exact(factory),
        "search": {"nprobe": section.nprobe, "rerank": section.rerank},
        "key_mapping": "global row g = files[i].first_row + row in metadata_{i}; its key is that row's `key`",
        "files": [{"index": f.index, "npy": str(f.npy.relative_to(root)), "metadata": str(f.meta.relative_to(root)),
                   "rows": f.rows, "first_row": int(first_rows[k])} for k, f in enumerate(check.files)],
        "shards": shards,
    }
    write_bytes_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def _pos(check: FolderCheck, file_index: int) -> int:
    return next(k for k, f in enumerate(check.files) if f.index == file_index)


def _check_factory(factory: str, dim: int) -> None:
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "invalid"
        raise InputError(f"reference.index_factory: {factory!r} is not a valid faiss factory string for "
                         f"dim {dim} ({first}); e.g. Flat or IVF4096,PQ96x8") from None


def _trained(out: Path, factory: str, dim: int, store: VectorStore, rows: np.ndarray, section: ReferenceSection,
             seed: int) -> dict[str, Any]:
    """The empty trained index every shard starts from (trained once; reused when it matches)."""
    empty = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if empty.is_trained:
        return {"file": None, "trained_on": 0}
    size = int(min(section.train_sample, rows.size))
    record_path, path = out / "trained.json", out / "trained.faiss"
    wanted = {"factory": factory, "seed": seed, "trained_on": size, "rows": int(rows.size)}
    if record_path.is_file() and path.is_file():
        record = json.loads(record_path.read_text())
        if {key: record.get(key) for key in wanted} == wanted and path.stat().st_size == record.get("bytes"):
            log.info("index training already done (%s on %d vectors)", factory, size)
            return record
    began = time.time()
    sample = np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
    empty.train(store.get(sample))
    _write_index_atomic(empty, path)
    record = {**wanted, "file": path.name, "train_s": round(time.time() - began, 3), "bytes": path.stat().st_size}
    write_bytes_atomic(record_path, json.dumps(record, indent=2).encode())
    log.info("index trained: %s on %d vectors, %.1f s", factory, size, record["train_s"])
    return record


def _write_index_atomic(index: faiss.Index, path: Path) -> None:
    with atomic_file(path, sync=False) as tmp:
        faiss.write_index(index, str(tmp))


def _build_shard(out: Path, j: int, start: int, end: int, store: VectorStore, excluded: np.ndarray,
                 factory: str, trained: dict[str, Any]) -> dict[str, Any]:
    record_path = out / f"shard_{j}.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if (record.get("rows") == [start, end] and record.get("factory") == factory
                and record.get("trained_on") == trained["trained_on"] and (out / record["file"]).is_file() and (out / record["file"]).stat().st_size == record["bytes"]):
            log.info("index shard %d already built", j)
            return record
    began = time.time()
    rows = np.setdiff1d(np.arange(start, end, dtype=np.int64), excluded, assume_unique=True)
    if trained["file"]:
        index = faiss.read_index(str(out / trained["file"]))
    else:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
    for block in range(0, rows.size, ADD_BLOCK):
        index.add(store.get(rows[block : block + ADD_BLOCK]))
    name, ids_name = f"shard_{j}.faiss", f"ids_{j}.npy"
    _write_index_atomic(index, out / name)
    save_npy_atomic(out / ids_name, rows)
    record = {"shard": j, "file": name, "ids": ids_name, "rows": [start, end], "vectors": int(rows.size),
              "factory": factory, "trained_on": trained["trained_on"], "build_s": round(time.time() - began, 3),
              "bytes": (out / name).stat().st_size}
    write_bytes_atomic(record_path, json.dumps(record, indent=2).encode())
    log.info("index shard %d: %d vectors, %s, %.1f s", j, rows.size, factory, record["build_s"])
    return record


def _write_exclusions(out: Path, check: FolderCheck, first_rows: list[int]) -> None:
    items = sorted(check.excluded.items())
    table = pa.table({
        "file_index": pa.array([i for (i, _), _ in items], pa.int32()),
        "row": pa.array([r for (_, r), _ in items], pa.int64()),
        "global_row": pa.array([first_rows[_pos(check, i)] + r for (i, r), _ in items], pa.int64()),
        "reason": pa.array([reason for _, reason in items], pa.string()),
    })
    write_parquet_atomic(out / "excluded.parquet", table)


def load_manifest(index_dir: Path) -> dict[str, Any]:
    path = index_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{index_dir}: no {MANIFEST}; build the index with `memaudit reference index`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: format version {manifest.get('format_version')} is not {FORMAT_VERSION}; rebuild it")
    return manifest
