"""Deterministic planning: distinct prompts in source order, cut into zero-padded shards.

The plan depends only on the prompt source and ``prompts_per_shard``; a shard's sample rows
depend only on the plan, ``samples_per_prompt`` and the run seed. Workers, batch sizes and cluster
shape never enter, so every planned ``sample_id`` exists exactly once and resumes line up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit import ids, schema
from audit.errors import InputError
from audit.prompts import RawPrompts


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work and of resume. A round shard of an adaptive run (docs/screening.md,
    "Rounds") holds samples ``first_sample`` up to ``end_sample`` of its prompts; a plan shard
    holds them from 0 (``end_sample`` None: ``generation.samples_per_prompt``)."""

    index: int
    name: str
    prompt_ids: tuple[str, ...]
    prompts: tuple[str, ...]
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

    @property
    def sha256(self) -> str:
        """Hash of the planned prompt ids, in order."""
        joined = "\n".join(self.table.column("prompt_id").to_pylist())
        return hashlib.sha256(joined.encode()).hexdigest()

    def shards(self) -> list[ShardSpec]:
        pids = self.table.column("prompt_id").to_pylist()
        texts = self.table.column("prompt").to_pylist()
        step = self.prompts_per_shard
        return [
            ShardSpec(
                index=i,
                name=ids.shard_name(i, self.n_shards),
                prompt_ids=tuple(pids[i * step : (i + 1) * step]),
                prompts=tuple(texts[i * step : (i + 1) * step]),
            )
            for i in range(self.n_shards)
        ]


def plan_prompts(raw: RawPrompts, prompts_per_shard: int, limit: int | None = None) -> PromptPlan:
    """De-duplicate prompts by id (first occurrence wins, occurrences counted) and shard them."""
    first: dict[str, int] = {}
    texts: dict[str, str] = {}
    counts: dict[str, int] = {}
    for position, text in enumerate(raw.prompts):
        normalized = ids.normalize_prompt(text)
        found_id = ids.prompt_id(normalized)
        if found_id in first:
            if texts[found_id] != normalized:
                raise InputError(
                    f"{raw.source}: prompts {texts[found_id]!r} and {normalized!r} share id {found_id} "
                    "(hash collision); remove one of them"
                )
            counts[found_id] += 1
            continue
        first[found_id], texts[found_id], counts[found_id] = position, normalized, 1
    chosen = list(first)[:limit] if limit else list(first)
    positions = [first[found_id] for found_id in chosen]
    columns = {
        "prompt_id": chosen,
        "prompt": [texts[found_id] for found_id in chosen],
        "shard": [i // prompts_per_shard for i in range(len(chosen))],
        "source_row": [raw.source_rows[p] for p in positions],
        "n_occurrences": [counts[found_id] for found_id in chosen],
    }
    for column in ("key", "url"):
        values = raw.carried.get(column)
        columns[column] = [values[p] for p in positions] if values else [None] * len(chosen)
    table = pa.Table.from_pydict(columns, schema=schema.PROMPTS)
    return PromptPlan(
        table=table,
        prompts_per_shard=prompts_per_shard,
        duplicates=len(raw.prompts) - len(first),
        skipped_blank=raw.skipped_blank,
    )


def shard_samples(shard: ShardSpec, samples_per_prompt: int, run_seed: int, first: int = 0) -> dict[str, np.ndarray]:
    """The sample rows of a shard, prompt by prompt, sample by sample: samples ``first`` up to
    ``samples_per_prompt`` of each prompt (a sample's id and seed never depend on the range)."""
    count = samples_per_prompt - first
    pids = np.repeat(np.array(shard.prompt_ids, dtype=object), count)
    idx = np.tile(np.arange(first, samples_per_prompt, dtype=np.int32), len(shard.prompt_ids))
    return {
        "prompt_id": pids,
        "prompt": np.repeat(np.array(shard.prompts, dtype=object), count),
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


def keep_prompts(shards: list[ShardSpec], keep: set[str], round_index: int = 0, first: int = 0,
                 end: int | None = None) -> list[ShardSpec]:
    """Each shard with only its prompts in ``keep`` (shards left empty are dropped), as the
    samples shards of round ``round_index`` holding samples ``first`` up to ``end``: a screened
    run's escalated prompts (round 0, whole first round), or the prompts a round sends on."""
    out = []
    for shard in shards:
        chosen = [i for i, pid in enumerate(shard.prompt_ids) if pid in keep]
        if chosen:
            out.append(ShardSpec(shard.index, round_shard_name(shard.name, round_index),
                                 tuple(shard.prompt_ids[i] for i in chosen), tuple(shard.prompts[i] for i in chosen),
                                 first_sample=first, end_sample=end))
    return out


def round_shard_name(plan_shard: str, round_index: int) -> str:
    """The samples shard of one round of a plan shard: the plan shard's name for the first round,
    ``<name>-r<k>`` for round k >= 1."""
    return plan_shard if round_index == 0 else f"{plan_shard}-r{round_index}"


def plan_shard_of(samples_shard: str) -> str:
    """The plan shard a samples shard belongs to (the inverse of :func:`round_shard_name`)."""
    return samples_shard.split("-r", 1)[0]
