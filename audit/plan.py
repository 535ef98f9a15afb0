"""Deterministic planning: distinct prompts in source order, cut into zero-padded shards.

The plan depends only on the prompt source and ``prompts_per_shard``; a shard's sample rows
depend only on the plan, ``samples_per_prompt`` and the run seed. Workers, batch sizes and cluster
shape never enter, so every planned ``sample_id`` exists exactly once and resumes line up.

Planning streams (docs/architecture.md, "Scale"): prompts are normalised and hashed a chunk at a
time, de-duplicated by their 64-bit ids with Arrow, and the plan is one Arrow table; its hash is
taken chunk by chunk and its shards are views of the table's columns, made when they are read. So
10^7 prompts cost Arrow columns, not Python objects per prompt.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit import ids, schema
from audit.errors import InputError
from audit.prompts import RawPrompts

CHUNK_ROWS = 1 << 16  # prompts normalised and hashed per step
# The plan table is one record batch per pyarrow's default Parquet row group (1Mi rows): the
# writer cuts pages along the chunks it is given, so prompts.parquet has the bytes a one-chunk
# table gives (the planning before streaming wrote one).
ROW_GROUP_ROWS = 1 << 20
ID_BYTES = ids.PROMPT_ID_HEX // 2  # a prompt id's bytes: its hex digits, two a byte
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


class Strings:
    """A string column (an Arrow array or chunked array) sliced without joining its chunks:
    ``ChunkedArray.slice`` walks every chunk and ``take`` joins them at each call."""

    def __init__(self, values: pa.Array | pa.ChunkedArray) -> None:
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        self.chunks: list[pa.Array] = [c for c in chunks if len(c)]
        self.starts: list[int] = [0]
        for chunk in self.chunks:
            self.starts.append(self.starts[-1] + len(chunk))

    def __len__(self) -> int:
        return self.starts[-1]

    def slice(self, start: int, length: int) -> pa.Array | pa.ChunkedArray:
        """Rows ``start`` up to ``start + length``: a zero-copy slice of one chunk when they lie in one."""
        length = max(0, min(length, len(self) - start))
        k = bisect.bisect_right(self.starts, start) - 1
        if length == 0 or k >= len(self.chunks):
            return pa.array([], pa.string())
        if start + length <= self.starts[k + 1]:
            return self.chunks[k].slice(start - self.starts[k], length)
        return pa.chunked_array(self.chunks, pa.string()).slice(start, length)


class TextColumn(Sequence[str]):
    """Rows ``start`` up to ``start + length`` of a :class:`Strings` column as a read-only sequence
    of ``str``, converted only when read. It compares equal to the tuple of its strings and pickles
    as that tuple, so a Ray task carries a shard's own strings, never the plan's buffers."""

    __slots__ = ("column", "start", "length")

    def __init__(self, column: Strings, start: int = 0, length: int | None = None) -> None:
        self.column, self.start = column, start
        self.length = max(0, min(len(column) - start, len(column) if length is None else length))

    def arrow(self) -> pa.Array | pa.ChunkedArray:
        """These strings as an Arrow (chunked) array, zero-copy."""
        return self.column.slice(self.start, self.length)

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[str, ...]: ...

    def __getitem__(self, i: int | slice) -> str | tuple[str, ...]:
        if isinstance(i, slice):
            return tuple(self)[i]
        if not -self.length <= i < self.length:
            raise IndexError("TextColumn index out of range")
        return self.arrow()[i % self.length].as_py()

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrow().to_pylist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextColumn):
            other = tuple(other)
        return isinstance(other, tuple) and tuple(self) == other

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return tuple, (tuple(self),)


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work and of resume. A round shard of an adaptive run (docs/screening.md,
    "Rounds") holds samples ``first_sample`` up to ``end_sample`` of its prompts; a plan shard
    holds them from 0 (``end_sample`` None: ``generation.samples_per_prompt``). ``prompt_ids`` and
    ``prompts`` are tuples, or on the driver :class:`TextColumn` views of the plan (they pickle as
    tuples)."""

    index: int
    name: str
    prompt_ids: Sequence[str]
    prompts: Sequence[str]
    first_sample: int = 0
    end_sample: int | None = None

    def n_samples(self, samples_per_prompt: int) -> int:
        """How many samples this shard holds."""
        end = samples_per_prompt if self.end_sample is None else self.end_sample
        return len(self.prompt_ids) * (end - self.first_sample)

    def sample_rows(self, samples_per_prompt: int, run_seed: int) -> dict[str, np.ndarray]:
        """This shard's sample rows (see :func:`shard_samples`)."""
        end = samples_per_prompt if self.end_sample is None else self.end_sample
        return shard_samples(self, end, run_seed, first=self.first_sample)


class PlanShards(Sequence[ShardSpec]):
    """The shards of a plan, ``prompts_per_shard`` prompts each in plan order: each
    :class:`ShardSpec` is made when it is read, its prompts a view of the plan's columns."""

    def __init__(self, table: pa.Table, prompts_per_shard: int) -> None:
        self.prompt_ids, self.prompts = Strings(table.column("prompt_id")), Strings(table.column("prompt"))
        self.per_shard = prompts_per_shard
        self.n_shards = -(-table.num_rows // prompts_per_shard)
        self.digits = len(ids.shard_name(0, self.n_shards)) - len("shard-")  # every name is as wide

    def __len__(self) -> int:
        return self.n_shards

    @overload
    def __getitem__(self, i: int) -> ShardSpec: ...

    @overload
    def __getitem__(self, i: slice) -> list[ShardSpec]: ...

    def __getitem__(self, i: int | slice) -> ShardSpec | list[ShardSpec]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n_shards))]
        if not -self.n_shards <= i < self.n_shards:
            raise IndexError("shard index out of range")
        i %= self.n_shards
        start = i * self.per_shard
        return ShardSpec(i, f"shard-{i:0{self.digits}d}", TextColumn(self.prompt_ids, start, self.per_shard),
                         TextColumn(self.prompts, start, self.per_shard))

    def __iter__(self) -> Iterator[ShardSpec]:
        return (self[i] for i in range(self.n_shards))


@dataclass(frozen=True)
class PromptPlan:
    """The planned prompts (the ``prompts/`` table) and their shards."""

    table: pa.Table
    prompts_per_shard: int
    duplicates: int
    skipped_blank: int

    @property
    def n_prompts(self) -> int:
        return self.table.num_rows

    @property
    def n_shards(self) -> int:
        return -(-self.n_prompts // self.prompts_per_shard)

    @cached_property
    def sha256(self) -> str:
        """Hash of the planned prompt ids, in order: SHA-256 of the ids joined by newlines (as
        run.json records it), taken chunk by chunk."""
        return joined_sha256(self.table.column("prompt_id"))

    def shards(self) -> PlanShards:
        """The plan's shards, made as they are read (a sequence: ``len``, index, iterate)."""
        return PlanShards(self.table, self.prompts_per_shard)


def joined_sha256(values: pa.ChunkedArray, rows_per_step: int = 1 << 20) -> str:
    """SHA-256 of ``"\\n".join(values)`` (UTF-8), fed ``rows_per_step`` strings at a time."""
    digest = hashlib.sha256()
    column, first = Strings(values), True
    for start in range(0, len(column), rows_per_step):
        piece = column.slice(start, rows_per_step)
        if isinstance(piece, pa.ChunkedArray):
            piece = piece.combine_chunks()
        one_list = pa.ListArray.from_arrays(pa.array([0, len(piece)], pa.int32()), piece)
        if not first:
            digest.update(b"\n")
        digest.update(pc.binary_join(one_list, "\n")[0].as_buffer())
        first = False
    return digest.hexdigest()


def hash_prompts(texts: list[str]) -> tuple[np.ndarray, list[int], list[str]]:
    """Each prompt's id as a big-endian 64-bit key (the 16 hex digits of
    :func:`audit.ids.prompt_id` of its normalised text, :func:`audit.ids.normalize_prompt`), and
    the positions and normalised texts of the prompts normalising changed. ASCII text takes a
    shortcut: NFC leaves ASCII as it is, and ``str.split`` and ``str.strip`` split on the same
    whitespace as the ``\\s`` of ``normalize_prompt``, so ``" ".join(text.split())`` is its
    normalised text."""
    digests, changed, changed_texts = [], [], []
    sha256 = hashlib.sha256
    for position, text in enumerate(texts):
        if text.isascii():
            clean = " ".join(text.split())
            digests.append(sha256(clean.encode()).digest()[:ID_BYTES])
        else:
            clean = ids.normalize_prompt(text)
            digests.append(bytes.fromhex(ids.prompt_id(clean)))
        if clean != text:
            changed.append(position)
            changed_texts.append(clean)
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64), changed, changed_texts


def hex_ids(keys: np.ndarray, rows_per_chunk: int = 1 << 20) -> pa.ChunkedArray:
    """Prompt ids (16 lowercase hex digits) of 64-bit keys, as an Arrow string column."""
    chunks = []
    for start in range(0, len(keys), rows_per_chunk):
        part = keys[start : start + rows_per_chunk].astype(">u8").view(np.uint8).reshape(-1, ID_BYTES)
        digits = np.empty((len(part), 2 * ID_BYTES), np.uint8)
        digits[:, 0::2], digits[:, 1::2] = _HEX_DIGITS[part >> 4], _HEX_DIGITS[part & 15]
        offsets = np.arange(0, digits.size + 1, 2 * ID_BYTES, dtype=np.int32)
        chunks.append(pa.Array.from_buffers(pa.string(), len(part), [None, pa.py_buffer(offsets),
                                                                     pa.py_buffer(digits.tobytes())]))
    return pa.chunked_array(chunks, pa.string())


def take_rows(values: pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    """``values[rows]`` for ascending ``rows``, chunk by chunk (one ``take`` per chunk of
    ``values``: pyarrow's ``take`` on a chunked array joins every chunk first)."""
    chunks, at = [], 0
    for chunk in values.chunks:
        end = at + len(chunk)
        lo, hi = np.searchsorted(rows, [at, end])
        if hi > lo:
            chunks.append(chunk.take(pa.array(rows[lo:hi] - at)))
        at = end
    return pa.chunked_array(chunks, values.type)


@dataclass(frozen=True)
class _Groups:
    """The source's prompts grouped by id: ``keys`` per distinct id in order of first occurrence,
    ``first`` (its first source position), ``counts``, and ``group`` (each position's group)."""

    keys: np.ndarray
    first: np.ndarray
    counts: np.ndarray
    group: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray) -> _Groups:
        encoded = pc.dictionary_encode(pa.array(keys, pa.uint64()))  # ids numbered as they first occur
        group = encoded.indices.to_numpy()
        distinct = encoded.dictionary.to_numpy()
        seen = np.maximum.accumulate(group)
        new = np.ones(len(group), bool)
        new[1:] = seen[1:] > seen[:-1]  # a group's first row is the one that raises the largest number seen
        return cls(distinct, np.flatnonzero(new), np.bincount(group, minlength=len(distinct)), group)


@dataclass(frozen=True)
class _Normalized:
    """The source's prompts normalised: the source's own text, except at ``rows`` (ascending),
    whose normalised text is in ``texts`` (most captions are normalised already)."""

    source: pa.ChunkedArray
    rows: np.ndarray
    texts: pa.ChunkedArray

    def take(self, rows: np.ndarray) -> pa.ChunkedArray:
        """The normalised prompts at ascending source positions ``rows``."""
        values = take_rows(self.source, rows)
        at = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        hit = self.rows[at] == rows if len(self.rows) else np.zeros(len(rows), bool)
        if not hit.any():
            return values
        replacements, chunks, done, used = take_rows(self.texts, at[hit]).combine_chunks(), [], 0, 0
        for chunk in values.chunks:
            mask = hit[done : done + len(chunk)]
            count = int(mask.sum())
            chunks.append(pc.replace_with_mask(chunk, pa.array(mask), replacements.slice(used, count)) if count else chunk)
            done, used = done + len(chunk), used + count
        return pa.chunked_array(chunks, pa.string())


def _normalize_source(raw: RawPrompts) -> tuple[_Normalized, np.ndarray]:
    """Every source prompt normalised, and its 64-bit id key, a chunk at a time."""
    keys, changed, changed_texts, offset = [], [], [], 0
    for batch in raw.table.column("prompt").chunks:
        for start in range(0, len(batch), CHUNK_ROWS):
            chunk = batch.slice(start, CHUNK_ROWS)
            chunk_keys, rows, texts = hash_prompts(chunk.to_pylist())
            keys.append(chunk_keys)
            changed.append(np.asarray(rows, np.int64) + offset)
            changed_texts.append(pa.array(texts, pa.string()))
            offset += len(chunk)
    normalized = _Normalized(raw.table.column("prompt"), np.concatenate(changed) if changed else np.empty(0, np.int64),
                             pa.chunked_array(changed_texts, pa.string()))
    return normalized, np.concatenate(keys) if keys else np.empty(0, np.uint64)


def _check_collisions(source: str, texts: _Normalized, groups: _Groups, rows_per_step: int = 1 << 20) -> None:
    """Refuse two different normalised prompts with one id, naming the first such pair in source
    order. Only rows whose id occurs more than once are compared with their id's first row,
    ``rows_per_step`` at a time."""
    repeated = np.flatnonzero(groups.counts[groups.group] > 1)
    for start in range(0, len(repeated), rows_per_step):
        rows = repeated[start : start + rows_per_step]
        firsts = groups.first[groups.group[rows]]
        order = np.argsort(firsts, kind="stable")
        first_texts = texts.take(firsts[order]).combine_chunks().take(pa.array(np.argsort(order)))
        row_texts = texts.take(rows).combine_chunks()
        differ = np.flatnonzero(~pc.equal(row_texts, first_texts).to_numpy(zero_copy_only=False))
        if len(differ):
            i = int(differ[0])
            group = groups.group[rows[i]]
            raise InputError(
                f"{source}: prompts {first_texts[i].as_py()!r} and {row_texts[i].as_py()!r} share id "
                f"{hex_ids(groups.keys[group : group + 1])[0].as_py()} (hash collision); remove one of them"
            )


def plan_prompts(raw: RawPrompts, prompts_per_shard: int, limit: int | None = None) -> PromptPlan:
    """De-duplicate prompts by id (first occurrence wins, occurrences counted) and shard them."""
    texts, keys = _normalize_source(raw)
    groups = _Groups.of(keys)
    _check_collisions(raw.source, texts, groups)
    n = min(limit, len(groups.keys)) if limit else len(groups.keys)
    batches = [_plan_batch(raw, texts, groups, start, min(n, start + ROW_GROUP_ROWS), prompts_per_shard)
               for start in range(0, n, ROW_GROUP_ROWS)]
    return PromptPlan(
        table=pa.Table.from_batches(batches, schema=schema.PROMPTS),
        prompts_per_shard=prompts_per_shard,
        duplicates=raw.n_prompts - len(groups.keys),
        skipped_blank=raw.skipped_blank,
    )


def _plan_batch(raw: RawPrompts, texts: _Normalized, groups: _Groups, start: int, stop: int,
                per_shard: int) -> pa.RecordBatch:
    """Planned prompts ``start`` up to ``stop`` (one Parquet row group of ``prompts.parquet``):
    each distinct prompt's id, normalised text, shard, first source row, occurrences and carried
    columns."""
    rows = groups.first[start:stop]
    columns = {
        "prompt_id": hex_ids(groups.keys[start:stop]).combine_chunks(),
        "prompt": texts.take(rows).combine_chunks(),
        "shard": pa.array(np.arange(start, stop, dtype=np.int64) // per_shard, pa.int32()),
        "source_row": take_rows(raw.table.column("source_row"), rows).combine_chunks(),
        "n_occurrences": pa.array(groups.counts[start:stop], pa.int32()),
    }
    for column in ("key", "url"):
        present = column in raw.table.column_names
        columns[column] = (take_rows(raw.table.column(column), rows).combine_chunks() if present
                           else pa.nulls(stop - start, pa.string()))
    return pa.record_batch(list(columns.values()), schema=schema.PROMPTS)


def shard_samples(shard: ShardSpec, samples_per_prompt: int, run_seed: int, first: int = 0) -> dict[str, np.ndarray]:
    """The sample rows of a shard, prompt by prompt, sample by sample: samples ``first`` up to
    ``samples_per_prompt`` of each prompt (a sample's id and seed never depend on the range)."""
    count = samples_per_prompt - first
    prompt_ids = list(shard.prompt_ids)
    pids = np.repeat(np.array(prompt_ids, dtype=object), count)
    idx = np.tile(np.arange(first, samples_per_prompt, dtype=np.int32), len(prompt_ids))
    return {
        "prompt_id": pids,
        "prompt": np.repeat(np.array(list(shard.prompts), dtype=object), count),
        "sample_idx": idx,
        "sample_id": np.array([ids.sample_id(p, int(i)) for p, i in zip(pids, idx)], dtype=object),
        "seed": np.array(
            [ids.sample_seed(run_seed, p, int(i)) for p, i in zip(pids, idx)], dtype=np.int64
        ),
    }


def round_ends(samples_per_prompt: int, max_samples_per_prompt: int | None) -> list[int]:
    """Samples per prompt after each round of an adaptive run: the first round is
    ``samples_per_prompt``, each next one doubles it, the last stops at the maximum (one round
    without a maximum)."""
    ends = [samples_per_prompt]
    while max_samples_per_prompt is not None and ends[-1] < max_samples_per_prompt:
        ends.append(min(2 * ends[-1], max_samples_per_prompt))
    return ends


@dataclass(frozen=True)
class _ShardRows:
    """Where the prompts of a sequence of shards lie: shard ``j`` holds rows ``starts[j]`` up to
    ``starts[j] + lengths[j]`` of ``prompt_ids`` and ``prompts`` (ascending, never overlapping)."""

    prompt_ids: Strings
    prompts: Strings
    starts: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, shards: Sequence[ShardSpec]) -> _ShardRows:
        """The plan's own columns for :class:`PlanShards`, the columns they view when every shard
        is a view of the same two (what :func:`keep_prompts` returns), else new columns."""
        if isinstance(shards, PlanShards):
            starts = np.arange(len(shards), dtype=np.int64) * shards.per_shard
            lengths = np.minimum(shards.per_shard, len(shards.prompt_ids) - starts)
            return cls(shards.prompt_ids, shards.prompts, starts, lengths)
        views = [(s.prompt_ids, s.prompts) for s in shards]
        if views and all(isinstance(i, TextColumn) and isinstance(t, TextColumn) and i.column is views[0][0].column
                         and t.column is views[0][1].column and (i.start, i.length) == (t.start, t.length)
                         for i, t in views):
            starts = np.array([i.start for i, _ in views], np.int64)
            lengths = np.array([i.length for i, _ in views], np.int64)
            if np.all(starts[1:] >= starts[:-1] + lengths[:-1]):
                return cls(views[0][0].column, views[0][1].column, starts, lengths)
        lengths = np.array([len(i) for i, _ in views], np.int64)
        return cls(Strings(pa.array([p for i, _ in views for p in i], pa.string())),
                   Strings(pa.array([p for _, t in views for p in t], pa.string())),
                   np.cumsum(lengths) - lengths, lengths)


def keep_prompts(shards: Sequence[ShardSpec], keep: Collection[str] | pa.Array | pa.ChunkedArray,
                 round_index: int = 0, first: int = 0, end: int | None = None) -> list[ShardSpec]:
    """Each shard with only its prompts in ``keep`` (shards left empty are dropped), as the
    samples shards of round ``round_index`` holding samples ``first`` up to ``end``: a screened
    run's escalated prompts (round 0, whole first round), or the prompts a round sends on.
    ``keep``: prompt ids, a Python collection or an Arrow string array; membership is one Arrow
    ``is_in`` over the columns the shards view."""
    if not isinstance(shards, Sequence):
        shards = list(shards)
    where = _ShardRows.of(shards)
    if not len(where.prompt_ids):
        return []
    if isinstance(keep, pa.ChunkedArray):
        keep = keep.combine_chunks()
    wanted = keep if isinstance(keep, pa.Array) else pa.array(list(keep), pa.string())
    all_ids = pa.chunked_array(where.prompt_ids.chunks, pa.string())
    rows = np.flatnonzero(pc.is_in(all_ids, value_set=wanted).to_numpy(zero_copy_only=False))
    shard_of = np.searchsorted(where.starts, rows, side="right") - 1
    inside = (shard_of >= 0) & (rows < where.starts[np.maximum(shard_of, 0)] + where.lengths[np.maximum(shard_of, 0)])
    rows, shard_of = rows[inside], shard_of[inside]
    kept_ids = Strings(take_rows(all_ids, rows))
    kept_prompts = Strings(take_rows(pa.chunked_array(where.prompts.chunks, pa.string()), rows))
    starts = np.flatnonzero(np.diff(shard_of, prepend=-1))
    out = []
    for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)]):
        shard = shards[int(shard_of[start])]
        out.append(ShardSpec(shard.index, round_shard_name(shard.name, round_index),
                             TextColumn(kept_ids, start, stop - start), TextColumn(kept_prompts, start, stop - start),
                             first_sample=first, end_sample=end))
    return out


def round_shard_name(plan_shard: str, round_index: int) -> str:
    """The samples shard of one round of a plan shard: the plan shard's name for the first round,
    ``<name>-r<k>`` for round k >= 1."""
    return plan_shard if round_index == 0 else f"{plan_shard}-r{round_index}"


def plan_shard_of(samples_shard: str) -> str:
    """The plan shard a samples shard belongs to (the inverse of :func:`round_shard_name`)."""
    return samples_shard.split("-r", 1)[0]
