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


def generated_pairs(matches: pa.Table | None) -> dict[str, np.ndarray]:
    """Per sample, over its verified pairs: the closest pixel distance (low-information pairs left
    out: their distance says nothing) and the best split-product, the generated side of the
    calibration's null."""
    empty = {"tiled_l2": np.zeros(0), "split_product": np.zeros(0)}
    if matches is None or matches.num_rows == 0:
        return empty
    ok = matches.filter(pc.equal(matches.column("status"), "ok"))
    closest: dict[str, float] = {}
    best: dict[str, float] = {}
    for sid, tiled, split, label in zip(ok.column("sample_id").to_pylist(), ok.column("tiled_l2").to_pylist(),
                                        ok.column("split_product").to_pylist(), ok.column("label").to_pylist()):
        best[sid] = max(best.get(sid, -np.inf), split)
        if label != "low_information":
            closest[sid] = min(closest.get(sid, np.inf), tiled)
    return {"tiled_l2": np.array(list(closest.values())), "split_product": np.array(list(best.values()))}
