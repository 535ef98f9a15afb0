"""The Ray wiring: the one module that knows about Ray (DESIGN §5).

``run_audit`` checks inputs (no Ray), starts or joins Ray, opens the run and hands the shards
that are not complete yet to a pool of generation actors. Each actor loads the pipeline once and
writes whole shards itself (temporary file, rename, marker), so images never pass through the
driver, which only holds shard names and small summaries. An actor that dies is replaced and its
shard retried; a shard that keeps failing is reported and left for the next run to redo.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from audit.config import AuditConfig
from audit.errors import InputError
from audit.generate import shard as gen_shard
from audit.generate.loading import resolve_numerics
from audit.plan import ShardSpec
from audit.runs import PreparedInputs, open_run, prepare_inputs
from audit.schema import STATUS_ERROR
from audit.store import RunStore

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``),
    else start a local one bound to the loopback interface. Returns True if it started Ray."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    _loopback_only()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=True)
    return True


def _loopback_only() -> None:
    # Ray resolves "127.0.0.1" to the machine's routable address unless multi-node clusters are
    # off; turning them off (for this process and the workers it spawns) makes every Ray
    # process of a local instance listen on 127.0.0.1 only.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


@ray.remote(max_restarts=0)
class GenerationWorker:
    """A Ray actor holding one loaded pipeline; it generates and writes whole shards."""

    def __init__(self, cfg: dict[str, Any], run_path: str, device: str, dtype: str) -> None:
        from audit.generate.stage import GenerateStage

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.cfg = AuditConfig.model_validate(cfg)
        self.store = RunStore(run_path)
        self.stage = GenerateStage(self.cfg, device, dtype)

    def describe(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": self.stage.device,
                "dtype": self.stage.dtype}

    def run(self, shard: ShardSpec, retry_only: bool) -> dict[str, Any]:
        work = gen_shard.retry_failed_samples if retry_only else gen_shard.generate_shard
        extra = {"device": self.stage.device, "dtype": self.stage.dtype, "pid": os.getpid(),
                 "batch_size": self.cfg.compute.batch_size}
        return work(self.stage, self.store, self.cfg, shard, **extra)


@dataclass
class GenerationReport:
    """What one invocation did to the samples/ table."""

    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    samples_ok: int = 0
    samples_error: int = 0
    first_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    generation_window_s: float = 0.0  # first shard start to last shard end, on the workers
    samples_written: int = 0

    @property
    def images_per_second(self) -> float:
        return self.samples_written / self.generation_window_s if self.generation_window_s else 0.0


@dataclass(frozen=True)
class AuditResult:
    run_path: Path
    generation: GenerationReport


def run_audit(cfg: AuditConfig, address: str | None = None, retry_failed: bool = False) -> AuditResult:
    """Generate every planned sample of the run ``cfg`` describes, resuming what exists."""
    inputs = prepare_inputs(cfg)
    started = connect(address or cfg.compute.address)
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        device, dtype = resolve_numerics(cfg.model, has_gpus)
        store = open_run(inputs, device.split(":")[0], dtype)
        report = generate_samples(store, inputs, device, dtype, retry_failed)
        return AuditResult(store.path, report)
    finally:
        if started:
            ray.shutdown()


def _worker_resources(cfg: AuditConfig, device: str, n_workers: int) -> dict[str, float]:
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    if device.startswith("cuda"):
        cpus = 1 if cfg.compute.cpus_per_worker == "auto" else cfg.compute.cpus_per_worker
        return {"num_gpus": cfg.compute.gpus_per_worker, "num_cpus": cpus}
    cpus = max(1, total_cpus // n_workers) if cfg.compute.cpus_per_worker == "auto" else cfg.compute.cpus_per_worker
    if cpus > total_cpus:
        raise InputError(
            f"compute.cpus_per_worker: {cpus} but the Ray cluster has {total_cpus} CPUs; lower it or use auto"
        )
    return {"num_cpus": cpus}


def _n_workers(cfg: AuditConfig, device: str, n_todo: int) -> int:
    if cfg.compute.num_workers != "auto":
        return min(int(cfg.compute.num_workers), n_todo)
    if device.startswith("cuda"):
        gpus = ray.cluster_resources().get("GPU", 1)
        return max(1, min(n_todo, int(gpus // cfg.compute.gpus_per_worker)))
    return 1


def _plan_work(store: RunStore, shards: list[ShardSpec], retry_failed: bool) -> tuple[list[tuple[ShardSpec, bool]], int]:
    todo: list[tuple[ShardSpec, bool]] = []
    skipped = 0
    removed = store.remove_stale_tmp(gen_shard.TABLE)
    if removed:
        log.info("removed %d stale temporary files", removed)
    for spec in shards:
        if not store.is_complete(gen_shard.TABLE, spec.name):
            todo.append((spec, False))
            continue
        marker = store.read_marker(gen_shard.TABLE, spec.name) or {}
        if retry_failed and marker.get("status_counts", {}).get(STATUS_ERROR, 0):
            todo.append((spec, True))
        else:
            skipped += 1
    return todo, skipped


def generate_samples(
    store: RunStore, inputs: PreparedInputs, device: str, dtype: str, retry_failed: bool = False
) -> GenerationReport:
    """Run the shards of ``samples/`` that are missing (or, with ``retry_failed``, that hold
    failed rows) on a pool of generation actors."""
    cfg = inputs.cfg
    started = time.time()
    shards = inputs.plan.shards()
    todo, skipped = _plan_work(store, shards, retry_failed)
    report = GenerationReport(shards_total=len(shards), shards_skipped=skipped)
    if not todo:
        log.info("samples: all %d shards complete; nothing to generate", len(shards))
        return report
    n_workers = _n_workers(cfg, device, len(todo))
    resources = _worker_resources(cfg, device, n_workers)
    log.info("samples: %d shards to do, %d complete; %d workers with %s", len(todo), skipped, n_workers, resources)
    pool = _WorkerPool(cfg, store, device, dtype, resources)
    try:
        _schedule(pool, n_workers, todo, cfg, report)
    finally:
        pool.shutdown()
    report.seconds = time.time() - started
    return report


class _WorkerPool:
    def __init__(self, cfg: AuditConfig, store: RunStore, device: str, dtype: str, resources: dict[str, float]) -> None:
        self.args = (cfg.to_dict(), str(store.path), device, dtype)
        self.resources = resources
        self.workers: list[Any] = []

    def start(self) -> Any:
        worker = GenerationWorker.options(**self.resources).remote(*self.args)
        try:
            info = ray.get(worker.describe.remote())
        except RayActorError as exc:
            raise RuntimeError(f"a generation worker failed to start: {_reason(exc)}") from None
        log.info("generation worker ready: %s", info)
        self.workers.append(worker)
        return worker

    def replace(self, dead: Any) -> Any:
        if dead in self.workers:
            self.workers.remove(dead)
        return self.start()

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers.clear()


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def _schedule(
    pool: _WorkerPool, n_workers: int, todo: list[tuple[ShardSpec, bool]], cfg: AuditConfig, report: GenerationReport
) -> None:
    queue = deque(todo)
    attempts: dict[str, int] = {}
    in_flight: dict[Any, tuple[Any, ShardSpec, bool]] = {}
    windows: list[tuple[float, float]] = []
    per_shard = cfg.generation.samples_per_prompt

    def submit(worker: Any) -> None:
        if queue:
            spec, retry_only = queue.popleft()
            in_flight[worker.run.remote(spec, retry_only)] = (worker, spec, retry_only)

    total = sum(len(spec.prompt_ids) * per_shard for spec, _ in todo)
    with logging_redirect_tqdm(), tqdm(total=total, unit="img", desc="generate", disable=None) as bar:
        progress = _ProgressLog(total, len(todo), enabled=bar.disable)
        for _ in range(n_workers):
            submit(pool.start())
        progress.start = progress.last = time.time()  # rates count generation, not start-up
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            worker, spec, retry_only = in_flight.pop(ready[0])
            try:
                marker = ray.get(ready[0])
            except (RayActorError, RayTaskError) as exc:
                attempts[spec.name] = attempts.get(spec.name, 0) + 1
                reason = _reason(exc)
                if attempts[spec.name] < cfg.compute.max_attempts:
                    log.warning("%s failed (attempt %d): %s; retrying", spec.name, attempts[spec.name], reason)
                    queue.appendleft((spec, retry_only))
                else:
                    log.error("%s failed %d times, giving up for this run: %s", spec.name, attempts[spec.name], reason)
                    report.shards_failed[spec.name] = reason
                if isinstance(exc, RayActorError):
                    worker = pool.replace(worker)
                submit(worker)
                continue
            _record(report, marker, windows)
            bar.update(len(spec.prompt_ids) * per_shard)
            progress.shard_done(len(spec.prompt_ids) * per_shard)
            submit(worker)
    if windows:
        report.generation_window_s = max(end for _, end in windows) - min(start for start, _ in windows)


class _ProgressLog:
    """Progress as log lines (at most one per ``every_s``) where no progress bar is shown,
    e.g. in Ray job logs."""

    def __init__(self, total: int, shards: int, enabled: bool, every_s: float = 10.0) -> None:
        self.total, self.shards, self.enabled, self.every_s = total, shards, enabled, every_s
        self.done = self.shards_done = 0
        self.start = self.last = time.time()

    def shard_done(self, images: int) -> None:
        self.done += images
        self.shards_done += 1
        now = time.time()
        if not self.enabled or (now - self.last < self.every_s and self.shards_done < self.shards):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        log.info("generate: %d/%d shards, %d/%d images, %.2f images/s, ETA %.0f s",
                 self.shards_done, self.shards, self.done, self.total, rate, eta)


def _record(report: GenerationReport, marker: dict[str, Any], windows: list[tuple[float, float]]) -> None:
    counts = marker.get("status_counts", {})
    report.shards_written += 1
    report.samples_written += int(marker.get("rows", 0))
    report.samples_ok += int(counts.get("ok", 0))
    errors = int(counts.get(STATUS_ERROR, 0))
    report.samples_error += errors
    if errors and len(report.first_errors) < 3:
        report.first_errors.append(f"{marker.get('shard')}: {errors} failed, e.g. {marker.get('first_error')}")
    windows.append((float(marker.get("started_at", 0)), float(marker.get("finished_at", 0))))
