"""Screening on Ray: the screen step's workers, one screen/ shard per task (docs/screening.md).

The workers are placed like generation workers (one per GPU by default); the decisions
(:func:`audit.screen.run_screen.write_escalation`) are made on the driver once every screen
shard is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit import layout
from audit.config import AuditConfig, ScreenSection
from audit.pipeline.model_workers import run_on_model_workers
from audit.runs import PreparedRun, leased_run, prepare_run
from audit.screen.run_screen import funnel, screen_complete, screen_plan, write_escalation
from audit.screen.screen_step import ScreenStep
from audit.step import ShardTask, StepReport, StepSpec
from audit.store import RunStore

log = logging.getLogger(__name__)


def screen_prompts(store: RunStore, prepared: PreparedRun, device: str, dtype: str) -> StepReport:
    """Run the screen/ shards that are missing on a pool of screening workers."""
    cfg = prepared.cfg
    assert cfg.screen is not None
    shards = screen_plan(prepared.plan, cfg.screen)
    store.remove_stale_tmp(layout.SCREEN)
    todo = [ShardTask(s.name, s, len(s.prompt_ids) * cfg.screen.seeds) for s in shards
            if not store.is_complete(layout.SCREEN, s.name)]
    if not todo:
        log.info("screen: all %d shards complete", len(shards))
        return StepReport(shards_total=len(shards), shards_skipped=len(shards))
    settings = {"cfg": cfg, "run": store.where, "lease": store.lease, "device": device, "dtype": dtype}
    return run_on_model_workers(cfg, device, StepSpec(ScreenStep, settings), todo, len(shards), "screen",
                                "screening", "seed", "screen")


def run_screen(cfg: AuditConfig, address: str | None = None, force: bool = False, wait: bool = False) -> ScreenResult:
    """``memaudit screen``: screen every prompt of the run ``cfg`` describes (a config without a
    ``screen:`` section screens with its defaults) and decide which to escalate, without
    generating anything. The run folder is the one ``memaudit run`` with the same config uses, so
    a later ``memaudit run`` goes on from the decisions; it is written under the run's lease, as
    by ``memaudit run`` (:mod:`audit.lease`)."""
    import ray

    from audit.generate.loading import resolve_numerics
    from audit.pipeline.ray_setup import ray_session

    if cfg.screen is None:
        cfg = cfg.model_copy(update={"screen": ScreenSection()})
    prepared = prepare_run(cfg)
    with ray_session(address or cfg.compute.address):
        device, dtype = resolve_numerics(cfg.model, ray.cluster_resources().get("GPU", 0) > 0)
        with leased_run(prepared, device.split(":")[0], dtype, force, wait, "memaudit screen") as (store, _):
            report = screen_prompts(store, prepared, device, dtype)
            store.sync()
            assert cfg.screen is not None
            if not screen_complete(store, screen_plan(prepared.plan, cfg.screen)):
                return ScreenResult(store.path, store.location, report, None)
            decided = write_escalation(store, cfg, prepared.plan)
    return ScreenResult(store.path, store.location, report, funnel(decided, cfg.screen))


@dataclass(frozen=True)
class ScreenResult:
    """What ``memaudit screen`` did."""

    run_path: Path
    location: str
    screen: StepReport
    escalation: dict[str, Any] | None  # run_screen.funnel; None: some screen shards failed
