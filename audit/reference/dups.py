"""Near-duplicate counts of every reference item (self-kNN within a cosine threshold).

Memorized training images are overwhelmingly the duplicated ones (Carlini et al. 2023;
Somepalli et al. 2023: 34x vs 11.6x on average), so Carlini's prompt selection ranks captions by
how many near-duplicates their image has. Each item's count is the number of *other* indexed
items with cosine >= ``threshold``, found over every shard by a faiss range search (exact Flat
shards) or by the exactly re-ranked k nearest neighbors, k growing until the threshold is
crossed (approximate shards). Written as ``dups/dups_{i}.parquet``, aligned with
``metadata/metadata_{i}.parquet``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.progress import Progress
from audit.reference.search import IndexShard, ReferenceIndex
from audit.files import write_parquet_atomic
from audit.layout import DUPS_DIR

log = logging.getLogger(__name__)
QUERY_BLOCK = 4096


def dups_path(root: Path, index: int) -> Path:
    return root / DUPS_DIR / f"dups_{index}.parquet"


def count_duplicates(reference: ReferenceIndex, threshold: float) -> dict[int, np.ndarray]:
    """File index -> per-row duplicate counts (-1 for rows left out of the index)."""
    files = reference.manifest["files"]
    indexed = np.zeros(reference.manifest["rows"], dtype=bool)
    for shard in reference.shards:
        indexed[np.asarray(shard.ids)] = True
    counts = np.full(reference.manifest["rows"], -1, dtype=np.int64)
    rows = np.flatnonzero(indexed)
    with Progress("duplicate counts", "item", int(rows.size)) as progress:
        for start in range(0, rows.size, QUERY_BLOCK):
            block = rows[start : start + QUERY_BLOCK]
            queries = reference.vectors.get(block)
            total = np.zeros(block.size, dtype=np.int64)
            for shard in reference.shards:
                total += _range_counts(shard, queries, threshold)
            counts[block] = total - 1  # every indexed item finds itself
            progress.update(int(block.size))
    return {int(f["index"]): counts[f["first_row"] : f["first_row"] + f["rows"]] for f in files}


def _range_counts(shard: IndexShard, queries: np.ndarray, threshold: float, first_k: int = 64) -> np.ndarray:
    """Items of ``shard`` with cosine >= ``threshold`` to each query."""
    if shard.exact:
        # faiss returns inner products > radius; step just below so that == threshold counts
        lims, _, _ = shard.index.range_search(queries, float(np.nextafter(np.float32(threshold), -1)))
        return np.diff(lims).astype(np.int64)
    # Approximate shards: a quantised range is unreliable, so take the exactly re-ranked k nearest and
    # count those above the threshold, growing k for the queries whose k are all above it.
    counts = np.zeros(queries.shape[0], dtype=np.int64)
    todo, k = np.arange(queries.shape[0]), first_k
    while todo.size:
        scores, _ = shard.search(queries[todo], min(k, shard.index.ntotal))
        above = (scores >= threshold).sum(axis=1)
        counts[todo] = above
        if k >= shard.index.ntotal:
            break
        todo, k = todo[above >= k], k * 4
    return counts


def write_dups(root: Path, reference: ReferenceIndex, threshold: float) -> dict[str, int]:
    """Count duplicates and write ``dups/``; returns a summary."""
    counts = count_duplicates(reference, threshold)
    histogram: dict[str, int] = {}
    for f in reference.manifest["files"]:
        i = int(f["index"])
        meta = pq.read_table(root / f["metadata"])
        columns = {name: meta.column(name) if name in meta.column_names else pa.nulls(meta.num_rows, pa.string())
                   for name in ("key", "caption", "url")}
        columns["row"] = pa.array(np.arange(f["first_row"], f["first_row"] + f["rows"]), pa.int64())
        columns["dup_count"] = pa.array(counts[i], pa.int64())
        write_parquet_atomic(dups_path(root, i), pa.table(columns))
        for value in counts[i]:
            bucket = "excluded" if value < 0 else str(int(value))
            histogram[bucket] = histogram.get(bucket, 0) + 1
    return histogram
