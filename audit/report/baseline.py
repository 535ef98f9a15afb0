"""Similarity distributions for the report: generated→train (each sample's nearest reference item)
against the train→train baseline (each sampled reference item's nearest *other* item), as in
Somepalli et al. 2023, Fig. 2: generations that copy sit in the baseline's duplicate tail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit.reference.index import INDEX_DIR
from audit.reference.search import ReferenceIndex


def generated_to_train(neighbors: pa.Table | None) -> np.ndarray:
    """Each sample's top-1 neighbour score."""
    if neighbors is None or neighbors.num_rows == 0:
        return np.zeros(0, np.float32)
    top = neighbors.filter(pc.and_(pc.equal(neighbors.column("rank"), 0), pc.greater_equal(neighbors.column("row"), 0)))
    return top.column("score").to_numpy().astype(np.float32)


def train_to_train(reference: Path, n: int = 2000, seed: int = 0) -> np.ndarray:
    """Nearest-other-item similarity of up to ``n`` seeded reference rows, through the index."""
    if not (reference / INDEX_DIR / "manifest.json").is_file():
        return np.zeros(0, np.float32)
    index = ReferenceIndex(reference)
    included = np.concatenate([np.asarray(s.ids) for s in index.shards])
    rows = np.sort(np.random.default_rng(seed).choice(included, size=min(n, included.size), replace=False))
    scores, found = index.search(index.vectors.get(rows), 2)
    other = np.where(found[:, 0] == rows, scores[:, 1], scores[:, 0])  # skip the item itself
    return other[np.isfinite(other)].astype(np.float32)
