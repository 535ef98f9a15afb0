"""The kNN join's pure parts: compatibility checks, query batching, the neighbours table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from audit.errors import InputError
from audit.schema import NEIGHBORS


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
