"""Adaptive rounds (docs/screening.md, "Rounds"): after each round of samples, which prompts are
decided and which get the next round.

A prompt is decided **memorized** once the run's own verdict flags it: the flag test
(``prompt_scores.flagged``), which counts its verified copies of its training image and its
clique against the false-label rates (docs/calibration.md; in paper mode one verified copy or a
clique of ``clique_min`` flags). A verified copy the flag test does not accept yet is evidence,
not a verdict: the prompt continues. It is decided **clean** once it has at least
``generation.clean_after_samples`` samples and no evidence about its own training image: no
sample verified as a pixel or template copy of it (``n_matching``, ``n_template``) and no clique
of its own samples that the flag test counts (``p_value`` 1). Copies of *other* training images
(Webster's retrieved verbatim) and cliques around them are evidence about those images' captions,
which detection already keeps out of this prompt's score; they do not keep it going. Otherwise it
**continues**, up to ``generation.max_samples_per_prompt``. The decisions after
round k are written to ``rounds/round-<k>.parquet`` before round k+1 starts, so a resumed run
takes the same decisions whatever prompt_scores say later.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from audit import layout
from audit.schema import ROUND
from audit.store import RunStore

MEMORIZED, CLEAN, CONTINUE = "memorized", "clean", "continue"


def decide(row: dict[str, Any], clean_after: int) -> tuple[str, str]:
    """(decision, reason) for one prompt_scores row after a round."""
    if row["flagged"]:
        return MEMORIZED, "flagged"
    if row["n_matching"] or row["n_template"] or row["p_value"] < 1.0:
        return CONTINUE, "evidence about its own training image, not conclusive yet"
    if row["n_samples"] >= clean_after:
        return CLEAN, f"no evidence about its own training image in {row['n_samples']} samples"
    return CONTINUE, f"no evidence yet, fewer than {clean_after} samples"


def read_round(store: RunStore, round_index: int) -> pa.Table | None:
    path = store.readable_file(layout.round_file(round_index))
    return pq.read_table(path).cast(ROUND) if path.exists() else None


def decide_round(store: RunStore, round_index: int, plan_shards: list[str], active: set[str],
                 clean_after: int) -> set[str]:
    """The prompts of ``active`` that go on to round ``round_index + 1``: from the recorded
    decisions when this round was decided before, else decided now from prompt_scores (complete
    for ``plan_shards``) and recorded."""
    recorded = read_round(store, round_index)
    if recorded is None:
        rows: dict[str, dict[str, Any]] = {}
        for shard in plan_shards:
            for row in pq.read_table(store.readable(layout.PROMPT_SCORES, shard)).to_pylist():
                if row["prompt_id"] in active:
                    rows[row["prompt_id"]] = row
        missing = active - set(rows)
        if missing:
            raise RuntimeError(f"round {round_index}: no scores for {len(missing)} prompts, e.g. {sorted(missing)[0]}")
        decided = [(pid, rows[pid]["n_samples"], *decide(rows[pid], clean_after)) for pid in sorted(rows)]
        recorded = pa.Table.from_pydict({name: [d[i] for d in decided] for i, name in enumerate(ROUND.names)},
                                        schema=ROUND)
        store.write_table(layout.ROUNDS, layout.round_file_name(round_index), recorded)
    return {pid for pid, decision in zip(recorded.column("prompt_id").to_pylist(),
                                          recorded.column("decision").to_pylist()) if decision == CONTINUE}


__all__ = ["CLEAN", "CONTINUE", "MEMORIZED", "decide", "decide_round", "read_round"]
