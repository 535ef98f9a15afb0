"""Similarity distributions for the report: generated→train (each sample's nearest reference item)
against the train→train baseline (each sampled reference item's nearest *other* item), as in
Somepalli et al. 2023, Fig. 2: generations that copy sit in the baseline's duplicate tail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from audit import layout
from audit.reference.index import INDEX_DIR
from audit.reference.search import ReferenceIndex
from audit.report.query import RunQuery

PLOT_POINTS = 200_000  # samples a plot draws at most; its numbers always count every sample


TOP1 = "from {neighbors} where rank = 0 and row >= 0"  # each sample's top-1 neighbour
BUCKETS = 65_536  # per unit of score: order statistics are found bucket by bucket


@dataclass(frozen=True)
class TopScores:
    """Each sample's top-1 neighbour score: how many there are, how many fall in each fine bucket
    (one pass, which also serves the quantiles) and, for the plot, at most ``PLOT_POINTS`` of them
    (a deterministic sample by sample_id past that)."""

    n: int
    buckets: np.ndarray  # rows of (bucket, count), ascending
    drawn: np.ndarray


def generated_to_train(q: RunQuery, n_samples: int) -> TopScores:
    """One pass over the top-1 neighbours: their fine-bucket counts, and the plot's points (about
    ``PLOT_POINTS`` of the run's ``n_samples``, chosen by sample_id as :func:`thinned`)."""
    found = q.arrow(f"select {_bucket('score')} as b, count(*) as n, "
                    f"list(score) filter (where {thinned(n_samples)}) as drawn {TOP1} group by b order by b")
    buckets = np.stack([found.column("b").to_numpy(), found.column("n").to_numpy()], axis=1).astype(np.int64) \
        if found.num_rows else np.zeros((0, 2), np.int64)
    drawn = pc.list_flatten(found.column("drawn")).to_numpy() if found.num_rows else np.zeros(0)
    return TopScores(int(buckets[:, 1].sum()), buckets, np.asarray(drawn, np.float32))


QUANTILES = {"median": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}


def quantiles(values: np.ndarray) -> dict[str, float] | None:
    """``n`` and the QUANTILES of ``values`` (``numpy.quantile``, linear); None for none."""
    if values.size == 0:
        return None
    found = np.quantile(values, list(QUANTILES.values()))
    return {"n": int(values.size), **{name: float(v) for name, v in zip(QUANTILES, found)}}


def generated_quantiles(q: RunQuery, top: TopScores) -> dict[str, float] | None:
    """The QUANTILES of every sample's top-1 neighbour score. When the plot's points hold them
    all, numpy's; past ``PLOT_POINTS`` samples, without holding them: the two order statistics
    each quantile falls between (:func:`order_statistics`), interpolated linearly as numpy does
    (equal to its result to the last bit or two)."""
    if top.drawn.size == top.n:
        return quantiles(top.drawn)
    position = (top.n - 1) * np.array(list(QUANTILES.values()))
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, top.n - 1)
    values = order_statistics(q, "score", TOP1, top.buckets, sorted({*low.tolist(), *high.tolist()}))
    found = [float(values[lo]) + (float(values[hi]) - float(values[lo])) * float(t)
             for lo, hi, t in zip(low.tolist(), high.tolist(), position - low)]
    return {"n": int(top.n), **dict(zip(QUANTILES, found))}


def _bucket(column: str) -> str:
    return f"cast(floor({column} * {BUCKETS}) as bigint)"


def bucket_counts(q: RunQuery, column: str, source: str) -> np.ndarray:
    """(bucket, count) rows of ``column`` over ``source`` (a FROM clause), ascending."""
    rows = q.rows(f"select {_bucket(column)} as b, count(*) {source} group by b order by b")
    return np.array(rows, np.int64).reshape(-1, 2)


def order_statistics(q: RunQuery, column: str, source: str, counts: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """The values of ``column`` at 0-based ``ranks`` of its ascending order over ``source``,
    without sorting them all: ``counts`` (:func:`bucket_counts`) says which fine buckets the
    ranks fall in, and only those are fetched and sorted by numpy."""
    ends = np.cumsum(counts[:, 1])
    where = {rank: int(np.searchsorted(ends, rank, side="right")) for rank in ranks}
    needed = sorted({int(counts[i, 0]) for i in where.values()})
    fetched = q.arrow(f"select {_bucket(column)} as b, {column} as v {source} and {_bucket(column)} in "
                      "(select unnest(?))", [needed])
    found: dict[int, float] = {}
    for rank, i in where.items():
        chosen = fetched.filter(pc.equal(fetched.column("b"), int(counts[i, 0]))).column("v").to_numpy()
        found[rank] = float(np.sort(chosen)[rank - (int(ends[i - 1]) if i else 0)])
    return found


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


def generated_pairs(q: RunQuery, n_samples: int) -> dict[str, np.ndarray]:
    """Per sample, over its verified pairs: the closest pixel distance (low-information pairs left
    out: their distance says nothing) and the best split-product, the generated side of the
    calibration's null (for the plot: the samples of every n-th matches/ shard, about
    ``PLOT_POINTS`` of the run's ``n_samples``; whole shards, so that only their files are read)."""
    every = -(-int(n_samples) // PLOT_POINTS)
    source = "{matches}" if every <= 1 else q.every_nth_file(layout.MATCHES, every)
    if source is None:
        return {"tiled_l2": np.zeros(0), "split_product": np.zeros(0)}
    found = q.numpy(f"""select cast(max(split_product) as double) as split_product,
                               cast(min(tiled_l2) filter (where label <> 'low_information') as double) as tiled_l2
                        from {source} where status = 'ok' group by sample_id""")
    tiled = found["tiled_l2"].astype(np.float64)
    return {"tiled_l2": tiled[np.isfinite(tiled)], "split_product": found["split_product"].astype(np.float64)}


def thinned(n: int) -> str:
    """SQL: keep about ``PLOT_POINTS`` of ``n`` samples, the same ones on every call (all of them
    up to ``PLOT_POINTS``)."""
    every = -(-n // PLOT_POINTS)
    return "true" if every <= 1 else f"hash(sample_id) % {every} = 0"
