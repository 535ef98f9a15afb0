"""``memaudit run``: generation, then sample embeddings, each resumable shard by shard.

``run_audit`` checks inputs (no Ray), starts or joins Ray, opens the run and hands the shards
that are not complete yet to pools of actors (see :mod:`audit.pipeline.pool`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from audit.config import AuditConfig
from audit.embed import samples as embed_samples_shard
from audit.generate import shard as gen_shard
from audit.generate.loading import resolve_numerics
from audit.errors import InputError
from audit.pipeline.detection import detect, join_neighbors
from audit.pipeline.pool import ActorPool, ShardTask, StageActor, run_tasks
from audit.pipeline.ray_setup import connect, cpu_actor_resources, embedding_placement
from audit.plan import ShardSpec
from audit.runs import PreparedInputs, open_run, prepare_inputs
from audit.schema import STATUS_ERROR
from audit.store import RunStore

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class GenerationWorker(StageActor):
    """A Ray actor holding one loaded pipeline (and, by default, the embedding model); it generates
    and writes whole shards."""

    def __init__(self, cfg: dict[str, Any], run_path: str, device: str, dtype: str, embed: bool) -> None:
        from audit.embed.stage import EmbedStage
        from audit.generate.stage import GenerateStage

        super().__init__(cfg)
        self.store = RunStore(run_path)
        self.stage = GenerateStage(self.cfg, device, dtype)
        self.embed = EmbedStage(self.cfg.embedding, device) if embed else None

    def describe(self) -> dict[str, Any]:
        embedding = self.embed.model_id if self.embed else None
        return {**super().describe(), "device": self.stage.device, "dtype": self.stage.dtype, "embedding": embedding}

    def run(self, shard: ShardSpec, retry_only: bool) -> dict[str, Any]:
        extra = {"device": self.stage.device, "dtype": self.stage.dtype, "pid": os.getpid(),
                 "batch_size": self.cfg.compute.batch_size}
        if retry_only:  # merges kept rows with regenerated ones: the embedding step re-embeds the shard
            return gen_shard.retry_failed_samples(self.stage, self.store, self.cfg, shard, **extra)
        return gen_shard.generate_shard(self.stage, self.store, self.cfg, shard, self.embed, **extra)


@ray.remote(max_restarts=0)
class SampleEmbedWorker(StageActor):
    """A Ray actor holding one embedding model; it embeds whole samples/ shards."""

    def __init__(self, cfg: dict[str, Any], run_path: str, device: str) -> None:
        from audit.embed.stage import EmbedStage

        super().__init__(cfg)
        self.store = RunStore(run_path)
        self.stage = EmbedStage(self.cfg.embedding, device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_id": self.stage.model_id}

    def run(self, shard: str) -> dict[str, Any]:
        return embed_samples_shard.embed_shard(self.stage, self.store, shard, pid=os.getpid())


@dataclass
class StepReport:
    """What one invocation did to a table written shard by shard."""

    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    rows_error: int = 0
    shards_with_generation: int = 0  # of shards_written: embedded by the generation workers


@dataclass
class GenerationReport(StepReport):
    """What one invocation did to the samples/ table."""

    samples_ok: int = 0
    samples_error: int = 0
    first_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    generation_window_s: float = 0.0  # first shard start to last shard end, on the workers
    samples_written: int = 0
    shards_embedded: set[str] = field(default_factory=set)  # embedded by the generation workers

    @property
    def images_per_second(self) -> float:
        return self.samples_written / self.generation_window_s if self.generation_window_s else 0.0


@dataclass(frozen=True)
class AuditResult:
    run_path: Path  # on this machine (the local mirror of an object-store run)
    generation: GenerationReport
    embeddings: StepReport = field(default_factory=StepReport)
    neighbors: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    location: str = ""  # the run folder as the user names it: a path or an object-store URI


def run_audit(cfg: AuditConfig, address: str | None = None, retry_failed: bool = False,
              force: bool = False) -> AuditResult:
    """Generate every planned sample of the run ``cfg`` describes, then embed the samples,
    resuming whatever exists."""
    inputs = prepare_inputs(cfg)
    from audit.embed.models import describe

    model_id = describe(cfg.embedding)  # a missing embedding model is bad input: refuse before any work
    if cfg.reference.path:
        _check_reference(cfg, model_id)
    started = connect(address or cfg.compute.address)
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        device, dtype = resolve_numerics(cfg.model, has_gpus)
        store = open_run(inputs, device.split(":")[0], dtype, force)
        report = generate_samples(store, inputs, device, dtype, retry_failed)
        store.sync()  # other nodes' shards (object-store runs)
        embedded = embed_samples(store, inputs, report.shards_embedded)
        store.sync()
        names = [spec.name for spec in inputs.plan.shards()]
        sizes = {spec.name: len(spec.prompt_ids) * cfg.generation.samples_per_prompt for spec in inputs.plan.shards()}
        if cfg.reference.path and str(cfg.reference.path).startswith("builtin:"):
            from audit.reference.builtin import resolve_reference

            resolved = str(resolve_reference(cfg.reference.path))
            cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"path": resolved})})
        joined = join_neighbors(store, cfg, names) if cfg.reference.path else {}  # written here: no sync needed
        detected = detect(store, cfg, names, sizes)
        store.sync()
        return AuditResult(store.path, report, embedded, joined, detected, store.location)
    finally:
        if started:
            ray.shutdown()


def _check_reference(cfg: AuditConfig, model_id: str) -> None:
    from audit.reference.builtin import resolve_reference
    from audit.reference.index import INDEX_DIR, load_manifest

    if str(cfg.reference.path).startswith("builtin:"):
        if model_id != "builtin:testbed-copy":
            raise InputError(f"reference.path {cfg.reference.path} is embedded with builtin:testbed-copy, but the "
                             f"embedding section gives {model_id}; use embedding.kind: builtin")
        return  # built on first use
    root = resolve_reference(str(cfg.reference.path))  # an object-store reference: mirrored here
    manifest = load_manifest(root / INDEX_DIR)
    index_model = manifest["embedding"]["model_id"]
    if index_model is not None and index_model != model_id:
        raise InputError(f"reference.path {root}: the index was embedded with {index_model} but the embedding "
                         f"section gives {model_id}; use the index's model or re-embed the reference")


def _worker_resources(cfg: AuditConfig, device: str, n_workers: int) -> dict[str, float]:
    if device.startswith("cuda"):
        cpus = 1 if cfg.compute.cpus_per_worker == "auto" else cfg.compute.cpus_per_worker
        return {"num_gpus": cfg.compute.gpus_per_worker, "num_cpus": cpus}
    return cpu_actor_resources(cfg.compute.cpus_per_worker, n_workers)


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
    embed = embeds_with_generation(cfg, device)
    pool = ActorPool(GenerationWorker, (cfg.to_dict(), store.location, device, dtype, embed), resources, "generation")
    per_prompt = cfg.generation.samples_per_prompt
    tasks = [ShardTask(spec.name, (spec, retry), len(spec.prompt_ids) * per_prompt) for spec, retry in todo]
    done = run_tasks(pool, n_workers, tasks, cfg.compute.max_attempts, "img", "generate")
    for marker in done.markers:
        _record(report, marker)
    report.shards_failed = done.failed
    report.generation_window_s = done.window_s
    report.seconds = time.time() - started
    return report


def embeds_with_generation(cfg: AuditConfig, device: str) -> bool:
    """Whether the generation workers embed their samples too: unless turned off, or the
    embedding section names another device than the one generating."""
    return cfg.compute.embed_with_generation and cfg.embedding.device in {"auto", device, device.split(":")[0]}


def _record(report: GenerationReport, marker: dict[str, Any]) -> None:
    counts = marker.get("status_counts", {})
    if marker.get("embedded"):
        report.shards_embedded.add(str(marker.get("shard")))
    report.shards_written += 1
    report.samples_written += int(marker.get("rows", 0))
    report.samples_ok += int(counts.get("ok", 0))
    errors = int(counts.get(STATUS_ERROR, 0))
    report.samples_error += errors
    report.rows_error += errors
    if errors and len(report.first_errors) < 3:
        report.first_errors.append(f"{marker.get('shard')}: {errors} failed, e.g. {marker.get('first_error')}")


def embed_samples(store: RunStore, inputs: PreparedInputs, embedded_now: set[str] | None = None) -> StepReport:
    """Embed every complete samples/ shard whose embeddings/ shard is missing or was made by
    another embedding model (``embedded_now``: shards the generation workers just embedded)."""
    from audit.embed.models import describe

    cfg = inputs.cfg
    model_id = describe(cfg.embedding)
    names = [spec.name for spec in inputs.plan.shards()]
    ready = [n for n in names if store.is_complete(gen_shard.TABLE, n)]
    todo = [n for n in ready if not store.is_current(embed_samples_shard.TABLE, n,
                                                     embed_samples_shard.inputs(store, n, model_id))]
    fresh = len(((embedded_now or set()) & set(ready)) - set(todo))
    report = StepReport(shards_total=len(names), shards_skipped=len(ready) - len(todo) - fresh,
                        shards_written=fresh, shards_with_generation=fresh)
    if not todo:
        return report
    device, resources, n_workers = embedding_placement(cfg.embedding.device, cfg.compute.cpus_per_worker)
    pool = ActorPool(SampleEmbedWorker, (cfg.to_dict(), store.location, device), resources, "embedding")
    per_prompt = cfg.generation.samples_per_prompt
    sizes = {spec.name: len(spec.prompt_ids) * per_prompt for spec in inputs.plan.shards()}
    tasks = [ShardTask(name, (name,), sizes[name]) for name in todo]
    done = run_tasks(pool, n_workers, tasks, cfg.compute.max_attempts, "img", "embed")
    report.shards_written += len(done.markers)
    report.shards_failed = done.failed
    report.rows_error = sum(int(m.get("status_counts", {}).get(STATUS_ERROR, 0)) for m in done.markers)
    return report
