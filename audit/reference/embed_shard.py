"""Embedding one img2dataset shard into one LAION-layout file pair (Ray-free).

Source shard number i becomes ``img_emb_{i}.npy`` + ``metadata_{i}.parquet`` (the rows that
embedded) and ``rejected_{i}.parquet`` (the rows that did not, each with its stage and reason);
their row counts add up to the source's. Files are written under temporary names and renamed;
the marker comes last, so a crash leaves the shard to be redone, never half-published.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from audit.config import AuditConfig
from audit.embed.embedding import EmbedStage
from audit.files import encode_marker, marker_fields, save_npy_atomic, write_bytes_atomic, write_parquet_atomic
from audit.lease import LeaseCheck
from audit.location import Location
from audit.reference.folder import emb_path, marker_path, meta_path, rejected_path
from audit.reference.sources import SourceShard, fetch, read_chunks

METADATA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("note", pa.string()),
    pa.field("source_shard", pa.string()),
])
REJECTED = pa.schema([
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("stage", pa.string()),  # "download" (img2dataset) or "decode" (memaudit)
    pa.field("reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("source_shard", pa.string()),
])


def _write_parquet(path: Path, rows: dict[str, list[Any]], schema: pa.Schema) -> int:
    return write_parquet_atomic(path, pa.Table.from_pydict(rows, schema=schema))


class ReferenceEmbedStep:
    """The reference-embedding step: one embedding model; a task ``(source shard, index)`` embeds
    that img2dataset shard into file pair ``index`` of the reference folder ``out`` (on object
    storage: fetched and published by the worker itself)."""

    def __init__(self, cfg: AuditConfig, out: Location, device: str, lease: LeaseCheck | None = None) -> None:
        self.out, self.lease = out, lease
        self.stage = EmbedStage(cfg.embedding, device)

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.stage.model_id}

    def run(self, task: tuple[SourceShard, int]) -> dict[str, Any]:
        shard, index = task
        return embed_source_shard(self.stage, self.out, fetch(shard), index, lease=self.lease)


def embed_source_shard(stage: EmbedStage, out: Location, shard: SourceShard, index: int,
                       chunk_rows: int = 256, lease: LeaseCheck | None = None) -> dict[str, Any]:
    """Embed every row of ``shard`` and publish file pair ``index``; returns the marker. In an
    object-store folder the files, then the marker, are uploaded before the local marker is written.
    ``lease`` (the check of the driver's lease on ``out``) is verified before anything is written
    and again before the pair is published."""
    root = out.local
    started = time.time()
    if lease is not None:
        lease.verify(f"embedding shard {index}")
    marker_path(root, index).unlink(missing_ok=True)
    vectors: list[np.ndarray] = []
    meta: dict[str, list[Any]] = {name: [] for name in METADATA.names}
    rejected: dict[str, list[Any]] = {name: [] for name in REJECTED.names}
    for rows in read_chunks(shard, chunk_rows):
        downloaded = [i for i, err in enumerate(rows["download_error"]) if err is None]
        for i, err in enumerate(rows["download_error"]):
            if err is not None:
                _reject(rejected, rows, i, "download", err, shard.name)
        embedded = stage({"image": np.array([rows["image"][i] for i in downloaded], dtype=object)})
        ok = [j for j, err in enumerate(embedded["error"]) if err is None]
        for j, err in enumerate(embedded["error"]):
            if err is not None:
                _reject(rejected, rows, downloaded[j], "decode", err, shard.name)
        for j in ok:
            i = downloaded[j]
            for name in ("key", "url", "caption"):
                meta[name].append(rows[name][i])
            meta["width"].append(int(embedded["width"][j]))
            meta["height"].append(int(embedded["height"][j]))
            meta["note"].append(embedded["note"][j])
            meta["source_shard"].append(shard.name)
        vectors.append(embedded["embedding"][ok])
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, stage.dim), np.float16)
    emb_bytes = save_npy_atomic(emb_path(root, index), matrix.astype(np.float16))
    meta_bytes = _write_parquet(meta_path(root, index), meta, METADATA)
    _write_parquet(rejected_path(root, index), rejected, REJECTED)
    marker = marker_fields(started, index=index, source=shard.source, source_format=shard.format,
                           rows_embedded=int(matrix.shape[0]), rows_rejected=len(rejected["key"]),
                           rejected_by_reason=dict(Counter(rejected["reason"])), model_id=stage.model_id,
                           dim=stage.dim, emb_bytes=emb_bytes, meta_bytes=meta_bytes)
    data = encode_marker(marker)
    if lease is not None:
        lease.verify(f"embedding shard {index}")
    out.publish_with_marker([emb_path(root, index), meta_path(root, index), rejected_path(root, index)],
                            marker_path(root, index), data)  # the object store first (when out is one)
    write_bytes_atomic(marker_path(root, index), data)
    return marker


def _reject(rejected: dict[str, list[Any]], rows: dict[str, list[Any]], i: int, stage: str, error: str,
            shard: str) -> None:
    for name in ("key", "url", "caption"):
        rejected[name].append(rows[name][i])
    rejected["stage"].append(stage)
    # decode errors read "<code>: ...", download errors "download: <img2dataset status>: ..."
    parts = error.split(":")
    rejected["reason"].append((parts[1] if stage == "download" and len(parts) > 2 else parts[0]).strip())
    rejected["error"].append(error)
    rejected["source_shard"].append(shard)
