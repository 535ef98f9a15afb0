"""The plan of a run as ``memaudit verify`` streams it (docs/architecture.md, "Verify at scale").

The prompts table is read in record batches, never whole: each batch carries the masks of the
screen's escalated prompts and of every round's "continue" decisions, and batches are cut into plan
shards along the ``shard`` column. A shard's planned sample ids are built as one Arrow array from
its prompts and sample range (:func:`audit.ids.sample_range_ids`), so
memory is bounded by one shard's rows plus the Arrow arrays of the escalated and continued prompt
ids, never a Python object per planned sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit.ids import sample_range_ids, shard_name
from audit.plan import round_shard_name

BATCH_ROWS = 65_536  # prompts read per record batch


@dataclass(frozen=True)
class SampleRange:
    """The samples one samples shard must hold: ``first`` up to ``end`` of each of its prompts."""

    name: str
    prompt_ids: pa.Array
    first: int
    end: int

    @property
    def n_samples(self) -> int:
        return len(self.prompt_ids) * (self.end - self.first)

    def sample_ids(self) -> pa.Array:
        """The planned sample ids, prompt by prompt, sample by sample."""
        if self.end <= self.first or len(self.prompt_ids) == 0:
            return pa.array([], pa.string())
        return sample_range_ids(self.prompt_ids, self.first, self.end)


@dataclass(frozen=True)
class PlanShard:
    """One plan shard: its prompts and the samples shards (its rounds) that hold their samples."""

    index: int
    name: str
    prompt_ids: pa.Array
    rounds: tuple[SampleRange, ...]


@dataclass(frozen=True)
class PlanSettings:
    """What shapes the planned samples: the shard count, the rounds' sample ends, the escalated
    prompts of a screened run (None: every prompt) and each recorded round's "continue" prompts."""

    n_shards: int
    ends: tuple[int, ...]
    escalated: pa.Array | None
    continued: tuple[pa.Array, ...]

    def masks(self, prompt_ids: pa.Array) -> list[np.ndarray]:
        """Per round, which of ``prompt_ids`` have samples planned in it."""
        first = np.ones(len(prompt_ids), bool) if self.escalated is None else _member(prompt_ids, self.escalated)
        return [first] + [_member(prompt_ids, c) for c in self.continued]

    def round_of(self, sample_idx: int) -> int | None:
        """The round whose samples shard holds sample ``sample_idx``, None past the last one."""
        for k, end in enumerate(self.ends):
            if sample_idx < end:
                return k
        return None


def _member(values: pa.Array, of: pa.Array) -> np.ndarray:
    return pc.is_in(values, value_set=of).to_numpy(zero_copy_only=False).astype(bool)


def prompt_batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)


class PlanOrderError(ValueError):
    """The prompts table is not in shard order (memaudit's planner always writes it so)."""


def plan_shards(path: Path, settings: PlanSettings) -> Iterator[PlanShard]:
    """Every plan shard in order (shards without prompts too), streamed from the prompts table."""
    pending_ids: list[pa.Array] = []
    pending_masks: list[list[np.ndarray]] = []
    current = 0
    last_seen = -1
    for batch in prompt_batches(path, ["prompt_id", "shard"]):
        pids = batch.column(0)
        shards = batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(shards) and (shards[0] < last_seen or np.any(np.diff(shards) < 0)):
            raise PlanOrderError(f"{path}: rows are not in shard order")
        masks = settings.masks(pids)
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else np.zeros(0, int)
        bounds = list(starts) + [len(shards)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            shard = int(shards[lo])
            if shard != current:
                yield from _flush(current, pending_ids, pending_masks, settings)
                pending_ids, pending_masks = [], []
                for empty in range(current + 1, min(shard, settings.n_shards)):
                    yield from _flush(empty, [], [], settings)
                current = shard
            pending_ids.append(pids.slice(lo, hi - lo))
            pending_masks.append([m[lo:hi] for m in masks])
        if len(shards):
            last_seen = int(shards[-1])
    if pending_ids or current < settings.n_shards:
        yield from _flush(current, pending_ids, pending_masks, settings)
    for empty in range(current + 1, settings.n_shards):
        yield from _flush(empty, [], [], settings)


def _flush(index: int, ids: list[pa.Array], masks: list[list[np.ndarray]],
           settings: PlanSettings) -> Iterator[PlanShard]:
    pids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    name = shard_name(index, settings.n_shards)
    rounds = []
    for k in range(len(settings.continued) + 1):
        mask = np.concatenate([m[k] for m in masks]) if masks else np.zeros(0, bool)
        first = 0 if k == 0 else settings.ends[k - 1]
        rounds.append(SampleRange(round_shard_name(name, k), pids.filter(pa.array(mask)), first, settings.ends[k]))
    yield PlanShard(index, name, pids, tuple(rounds))


def prompt_slices(path: Path, size: int) -> Iterator[pa.Array]:
    """The planned prompt ids in consecutive slices of ``size`` (the screen's shards)."""
    pending: list[pa.Array] = []
    held = 0
    for batch in prompt_batches(path, ["prompt_id"]):
        pending.append(batch.column(0))
        held += batch.num_rows
        while held >= size:
            joined = pa.concat_arrays(pending)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            pending, held = [rest], len(rest)
    if held:
        yield pa.concat_arrays(pending)


def planned_shard_of(path: Path, settings: PlanSettings,
                     wanted: dict[str, list[int]]) -> dict[tuple[str, int], str]:
    """For a few (prompt_id, sample_idx) pairs — the samples verify found outside their shard —
    the samples shard that plans them (pairs not planned at all are left out). One more streamed
    pass over the prompts table, looking only at ``wanted``'s prompts."""
    if not wanted:
        return {}
    lookup = pa.array(sorted(wanted), pa.string())
    found: dict[tuple[str, int], str] = {}
    for batch in prompt_batches(path, ["prompt_id", "shard"]):
        hits = np.flatnonzero(_member(batch.column(0), lookup))
        if not len(hits):
            continue
        pids = batch.column(0).take(pa.array(hits))
        masks = settings.masks(pids)
        shards = batch.column(1).take(pa.array(hits)).to_pylist()
        for row, (pid, shard) in enumerate(zip(pids.to_pylist(), shards)):
            for idx in wanted[pid]:
                k = settings.round_of(idx)
                if k is not None and k < len(masks) and masks[k][row]:
                    found[(pid, idx)] = round_shard_name(shard_name(int(shard), settings.n_shards), k)
    return found
