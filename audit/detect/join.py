"""The kNN join step: each sample's top-k reference neighbors, written as ``neighbors/`` shards.

Ray-free: :class:`JoinStep` reads a group of ``embeddings/`` shards, asks ``search`` (the fan-out
over the index shards, which the Ray layer provides) for their neighbors in one batch, and writes
one ``neighbors/`` shard per embeddings shard. Batching queries matters: faiss reaches GEMM speed
only with a few hundred queries per call (docs/architecture.md, "Scale").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit import layout
from audit.embed.storage import decode_embeddings
from audit.errors import InputError
from audit.reference.images import ReferenceImages
from audit.reference.index import INDEX_DIR
from audit.schema import NEIGHBORS
from audit.store import RunStore

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (scores, rows), merged


def check_compatible(manifest: dict[str, Any], model_id: str, dim: int, where: str) -> None:
    """Samples and index must come from the same embedding model (and so the same dimension)."""
    index_model = manifest["embedding"]["model_id"]
    index_dim = int(manifest["embedding"]["dim"])
    if dim != index_dim:
        raise InputError(f"{where}: the samples' embeddings have dim {dim} but the reference index has {index_dim}; "
                         "embed both sides with the same model (embedding section)")
    if index_model is not None and index_model != model_id:
        raise InputError(f"{where}: the samples were embedded with {model_id} but the reference index with "
                         f"{index_model}; set the embedding section to the index's model, or re-embed the reference")


def shard_of_rows(manifest: dict[str, Any], rows: np.ndarray) -> np.ndarray:
    starts = np.array([s["rows"][0] for s in manifest["shards"]], dtype=np.int64)
    numbers = np.array([s["shard"] for s in manifest["shards"]], dtype=np.int32)
    return np.where(rows >= 0, numbers[np.clip(np.searchsorted(starts, rows, side="right") - 1, 0, None)], -1)


def neighbor_table(sample_ids: list[str], prompt_ids: list[str], scores: np.ndarray, rows: np.ndarray,
                   keys: list[str | None], shards: np.ndarray) -> pa.Table:
    """One row per (sample, rank) found; ranks without a result (-1) are left out."""
    n, k = rows.shape
    valid = rows >= 0
    sample_index, rank = np.nonzero(valid)
    flat_keys = np.array(keys, dtype=object).reshape(n, k)
    return pa.table({
        "sample_id": pa.array([sample_ids[i] for i in sample_index], pa.string()),
        "prompt_id": pa.array([prompt_ids[i] for i in sample_index], pa.string()),
        "rank": pa.array(rank.astype(np.int16)),
        "row": pa.array(rows[valid].astype(np.int64)),
        "key": pa.array(flat_keys[valid].tolist(), pa.string()),
        "score": pa.array(scores[valid].astype(np.float32)),
        "shard": pa.array(shards[valid].astype(np.int32)),
    }, schema=NEIGHBORS)


def query_groups(sizes: dict[str, int], batch: int) -> list[list[str]]:
    """Consecutive run shards grouped so each group holds at least ``batch`` queries (the last may
    hold fewer): small shards share one faiss call per index shard."""
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, size in sizes.items():
        current.append(name)
        total += size
        if total >= batch:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


def manifest_hash(root: Path) -> str:
    """The index a join used, as recorded in its shards' inputs."""
    return hashlib.sha256((root / INDEX_DIR / "manifest.json").read_bytes()).hexdigest()[:16]


class JoinStep:
    """Writes ``neighbors/`` shards for groups of embedded shards, searching with ``search`` (set
    by the caller before the first :meth:`run`: the fan-out over the index shards)."""

    def __init__(self, store: RunStore, k: int, root: Path, manifest: dict[str, Any],
                 search: Search | None = None) -> None:
        self.store, self.k, self.manifest, self.search = store, k, manifest, search
        self.keys = ReferenceImages(root, manifest)
        self.settings = {"index": manifest_hash(root), "k": str(k)}

    def inputs(self, shard: str) -> dict[str, str]:
        """A neighbors shard is current while its embeddings shard, the index and k are unchanged."""
        return self.store.inputs_of(shard, (layout.EMBEDDINGS,), self.settings)

    def describe(self) -> dict[str, Any]:
        return {"index_vectors": self.manifest.get("count"), "k": self.k}

    def run(self, task: list[str]) -> dict[str, Any]:
        """Neighbors of every sample of the shards in ``task`` (one search); returns ``queries``."""
        sample_ids, prompt_ids, queries, owners = [], [], [], []
        for name in task:
            table = pq.read_table(self.store.readable(layout.EMBEDDINGS, name))
            dim = int(table.schema.field("embedding").metadata[b"dim"])
            sample_ids += table.column("sample_id").to_pylist()
            prompt_ids += table.column("prompt_id").to_pylist()
            queries.append(decode_embeddings(table.column("embedding"), dim).astype(np.float32))
            owners += [name] * table.num_rows
        q = np.concatenate(queries)
        assert self.search is not None, "JoinStep.search is set by the caller before run()"
        scores, rows = self.search(q, self.k)
        rows[~(np.linalg.norm(q, axis=1) > 0)] = -1  # samples without an embedding get no neighbors
        owner = np.array(owners)
        for name in task:
            sel = np.flatnonzero(owner == name)
            table = neighbor_table([sample_ids[i] for i in sel], [prompt_ids[i] for i in sel], scores[sel],
                                   rows[sel], self.keys.keys(rows[sel]), shard_of_rows(self.manifest, rows[sel]))
            self.store.invalidate(layout.NEIGHBORS, name)
            with self.store.open_shard(layout.NEIGHBORS, name, table.schema) as writer:
                writer.write(table)
                writer.commit(inputs=self.inputs(name), queries=int(sel.size))
        return {"shards": list(task), "queries": int(q.shape[0])}
