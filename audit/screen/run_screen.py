"""The screen's place in a run (Ray-free): its shards, the escalation file, the shards the full
audit then generates, and the checks made before any work (docs/screening.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit import layout
from audit.config import AuditConfig, GenerationSection, ScreenSection
from audit.errors import InputError
from audit.generate.families import Family
from audit.plan import PromptPlan, ShardSpec, keep_prompts
from audit.schema import ESCALATION, SCREEN, STATUS_OK
from audit.screen.escalate import decide, top_count
from audit.store import RunStore

log = logging.getLogger(__name__)


def check_screen(screen: ScreenSection, family: Family, generation: GenerationSection, n_prompts: int) -> None:
    """Refuse a screen the pipeline cannot run (every signal compares the conditional and the
    unconditional prediction); warn when ``screen.top`` escalates every prompt."""
    if not family.cfg:
        raise InputError(f"screen: {family.label} ({family.pipeline_class}) is guidance-distilled and makes no "
                         "unconditional prediction, which every screen signal compares with the conditional one; "
                         "remove the screen section and audit every prompt")
    if generation.guidance_scale <= 1:
        raise InputError(f"screen: generation.guidance_scale is {generation.guidance_scale}, so the pipeline makes no "
                         "unconditional prediction for the screen to compare; set generation.guidance_scale > 1 "
                         "or remove the screen section")
    if screen.steps > generation.steps:
        raise InputError(f"screen.steps ({screen.steps}) is more than generation.steps ({generation.steps}); the "
                         "screen reads the first screen.steps sampler steps: lower it")
    if isinstance(screen.top, int) and screen.top > n_prompts:
        log.warning("screen.top is %d but the run has %d prompts: every prompt is escalated", screen.top, n_prompts)


def screen_plan(plan: PromptPlan, screen: ScreenSection) -> list[ShardSpec]:
    """The screen's own shards: the planned prompts in order, ``screen.prompts_per_shard`` each."""
    return dataclasses.replace(plan, prompts_per_shard=screen.prompts_per_shard).shards()


def screen_complete(store: RunStore, shards: list[ShardSpec]) -> bool:
    return all(store.is_complete(layout.SCREEN, s.name) for s in shards)


def write_escalation(store: RunStore, cfg: AuditConfig, plan: PromptPlan) -> pa.Table:
    """Score every screened prompt and decide which go on; the table is written to
    ``escalation/escalation.parquet`` (rewritten only when it changed) and returned. Every screen
    shard must be complete."""
    assert cfg.screen is not None
    shards = screen_plan(plan, cfg.screen)
    columns = ["noise_magnitude", "alignment", "latent_update"]
    table = pa.concat_tables([pq.read_table(store.readable(layout.SCREEN, shard.name),
                                            columns=["prompt_id", "status", *columns]) for shard in shards]
                             or [SCREEN.empty_table().select(["prompt_id", "status", *columns])])
    # Column by column (a run may screen 10^7 prompts); nulls read as NaN. A prompt is unmeasured
    # when its screen failed or either first-step signal is missing (the latent update is optional).
    values = np.stack([table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in columns], axis=1)
    failed = pc.not_equal(table["status"], STATUS_OK).to_numpy(zero_copy_only=False)
    values[failed | np.isnan(values[:, 0]) | np.isnan(values[:, 1])] = np.nan
    row_of = {pid: i for i, pid in enumerate(table["prompt_id"].to_pylist())}
    order = plan.table.column("prompt_id").to_pylist()
    at = np.array([row_of.get(pid, -1) for pid in order], np.int64)
    values = np.where((at >= 0)[:, None], values[np.maximum(at, 0)], np.nan)
    decided = decide(order, values[:, 0], values[:, 1], cfg.screen.threshold, cfg.screen.top, values[:, 2])
    path = store.path / layout.escalation_file()
    if not path.exists() or not pq.read_table(path).cast(ESCALATION).equals(decided):
        store.write_table(layout.ESCALATION, layout.ESCALATION_FILE, decided)
    return decided


def escalation_digest(table: pa.Table) -> str:
    """A short hash of the decisions and scores (a detection input: new decisions redo detection)."""
    digest = hashlib.sha256()
    for name in ("prompt_id", "screen_score", "escalated"):
        digest.update(repr(table.column(name).to_pylist()).encode())
    return digest.hexdigest()[:16]


def escalated_shards(shards: list[ShardSpec], table: pa.Table) -> list[ShardSpec]:
    """The generation shards of a screened run: each plan shard keeps its name and only its
    escalated prompts; shards left empty are dropped (their prompts were decided by the screen)."""
    chosen = table.column("prompt_id").filter(table.column("escalated"))  # Arrow, not a set of 10^7 strings
    return keep_prompts(shards, chosen)


def screen_rows(shards: list[ShardSpec], table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Per plan shard, the escalation rows of its prompts (what detection adds to prompt_scores/)."""
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    return {shard.name: [rows[pid] for pid in shard.prompt_ids if pid in rows] for shard in shards}


def funnel(table: pa.Table, screen: ScreenSection) -> dict[str, Any]:
    """How many prompts were screened, measured and escalated, and why (for logs and run output)."""
    escalated = table.column("escalated").to_pylist()
    reasons = [r for r in table.column("escalation").to_pylist() if r]
    return {"screened": table.num_rows, "escalated": sum(escalated),
            "unmeasured": sum(1 for r in reasons if "screen error" in r),
            "top": top_count(screen.top, table.num_rows), "threshold": screen.threshold}
