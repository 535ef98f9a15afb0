"""Searching index shards: per-shard top-k (with exact re-ranking) and the pure merge across shards."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from audit.errors import InputError
from audit.reference.index import load_manifest
from audit.reference.vectors import VectorStore, normalise

log = logging.getLogger(__name__)


def read_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read a faiss index, memory-mapped where the index type allows it."""
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            log.debug("%s: this index type cannot be memory-mapped; reading it", path)
    return faiss.read_index(str(path))


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, rows) of shape (n, k_i), higher score first, into the overall
    top-k. Missing results (row -1) sort last; ties break by the lower row, so the result does
    not depend on shard order."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate([r for _, r in parts], axis=1)
    keyed = np.where(rows < 0, -np.inf, scores)
    order = _order(keyed, rows)[:, :k]
    top_scores = np.take_along_axis(keyed, order, axis=1)
    top_rows = np.take_along_axis(rows, order, axis=1)
    top_rows[~np.isfinite(top_scores)] = -1
    top_scores = np.where(np.isfinite(top_scores), top_scores, -np.inf).astype(np.float32)
    if top_scores.shape[1] < k:
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores, top_rows


def _order(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per query: score descending, then row ascending (two stable sorts, vectorised)."""
    by_row = np.argsort(rows, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(scores, by_row, axis=1), axis=1, kind="stable")
    return np.take_along_axis(by_row, by_score, axis=1)


class IndexShard:
    """One index shard: faiss search in local ids mapped to global rows, exact re-ranking for
    approximate indexes."""

    def __init__(self, index_dir: Path, record: dict[str, Any], vectors: VectorStore, exact: bool,
                 nprobe: int, rerank: int, mmap: bool = True) -> None:
        self.record, self.vectors, self.exact, self.rerank = record, vectors, exact, rerank
        self.index = read_index(index_dir / record["file"], mmap)
        self.ids = np.load(index_dir / record["ids"], mmap_mode="r")
        try:
            faiss.extract_index_ivf(self.index).nprobe = nprobe
        except RuntimeError:
            pass  # not an IVF index

    def search(self, queries: np.ndarray, k: int, rerank_block: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (n, k); queries are float32 unit rows. One faiss call for
        the whole batch (faiss parallelises over queries); the exact re-ranking goes in blocks
        of ``rerank_block`` queries to bound the gathered vectors' memory."""
        rerank = not self.exact and self.rerank > 1
        fetch = k * self.rerank if rerank else k
        scores, local = self.index.search(queries, min(fetch, max(self.index.ntotal, 1)))
        rows = np.where(local >= 0, np.asarray(self.ids)[np.maximum(local, 0)], -1)
        if rerank:
            scores = np.concatenate([self.vectors.cosine(queries[i : i + rerank_block], rows[i : i + rerank_block])
                                     for i in range(0, len(queries), rerank_block)])
        scores = np.where(rows >= 0, scores, -np.inf)
        return merge_topk([(scores, rows)], k)


class ReferenceIndex:
    """All shards of an index, searched in turn and merged (the single-process kNN)."""

    def __init__(self, root: Path, index_dir: Path | None = None, nprobe: int | None = None,
                 rerank: int | None = None, mmap: bool = True, only: list[int] | None = None) -> None:
        self.root = root
        self.index_dir = index_dir or root / "index"
        self.manifest = load_manifest(self.index_dir)
        files = self.manifest["files"]
        self.vectors = VectorStore([root / f["npy"] for f in files], [f["first_row"] for f in files])
        params = self.manifest["search"]
        self.shards = [IndexShard(self.index_dir, s, self.vectors, bool(self.manifest["exact"]),
                                  nprobe or params["nprobe"], rerank or params["rerank"], mmap)
                       for s in self.manifest["shards"] if only is None or s["shard"] in only]

    @property
    def model_id(self) -> str | None:
        return self.manifest["embedding"]["model_id"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    def check_queries(self, queries: np.ndarray, model_id: str | None) -> np.ndarray:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries have shape {queries.shape}, the index {self.index_dir} holds dim {self.dim}")
        if model_id is not None and self.model_id is not None and model_id != self.model_id:
            raise InputError(f"queries were embedded with {model_id} but the index {self.index_dir} with "
                             f"{self.model_id}; embed both sides with the same model")
        return normalise(np.ascontiguousarray(queries, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, model_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = self.check_queries(queries, model_id)
        return merge_topk([shard.search(q, k) for shard in self.shards], k)
