"""The pool that runs a diffusion pipeline: generation and screening workers are placed alike
(one per GPU by default, else one CPU worker with the node's CPUs; docs/architecture.md)."""

from __future__ import annotations

import logging
import time

import ray

from audit.config import AuditConfig
from audit.pipeline.pool import WorkerPool, run_tasks
from audit.pipeline.ray_setup import cpu_actor_resources
from audit.step import ShardTask, StepReport, StepSpec

log = logging.getLogger(__name__)


def worker_resources(cfg: AuditConfig, device: str, n_workers: int) -> dict[str, float]:
    if device.startswith("cuda"):
        cpus = 1 if cfg.compute.cpus_per_worker == "auto" else cfg.compute.cpus_per_worker
        return {"num_gpus": cfg.compute.gpus_per_worker, "num_cpus": cpus}
    return cpu_actor_resources(cfg.compute.cpus_per_worker, n_workers)


def worker_count(cfg: AuditConfig, device: str, n_todo: int) -> int:
    if cfg.compute.num_workers != "auto":
        return min(int(cfg.compute.num_workers), n_todo)
    if device.startswith("cuda"):
        gpus = ray.cluster_resources().get("GPU", 1)
        return max(1, min(n_todo, int(gpus // cfg.compute.gpus_per_worker)))
    return 1


def run_on_model_workers(cfg: AuditConfig, device: str, spec: StepSpec, todo: list[ShardTask], n_shards: int,
                         table: str, what: str, unit: str, desc: str) -> StepReport:
    """Run ``todo`` (the missing ones of ``n_shards`` shards of ``table``) on a pool of pipeline
    workers built from ``spec`` (``what``: the workers' name in the log; ``unit``, ``desc``: the
    progress bar's); the report counts the rest as skipped and times the whole call."""
    started = time.time()
    n_workers = worker_count(cfg, device, len(todo))
    resources = worker_resources(cfg, device, n_workers)
    log.info("%s: %d shards to do, %d complete; %d workers with %s", table, len(todo), n_shards - len(todo),
             n_workers, resources)
    report = run_tasks(WorkerPool(spec, resources, what), n_workers, todo, cfg.compute.max_attempts, unit, desc)
    report.shards_total, report.shards_skipped = n_shards, n_shards - len(todo)
    report.seconds = time.time() - started
    return report


__all__ = ["run_on_model_workers", "worker_count", "worker_resources"]
