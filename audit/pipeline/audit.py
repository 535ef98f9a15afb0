"""``memaudit run``: generation, sample embeddings, the kNN join and detection, each resumable
shard by shard.

``run_audit`` checks inputs (no Ray), starts or joins Ray, prepares the reference, opens the run
and hands the shards that are not complete yet to pools of step workers (:mod:`audit.pipeline.pool`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from audit import layout
from audit.config import AuditConfig
from audit.detect.rounds import decide_round, read_round
from audit.detect.thresholds import Thresholds
from audit.embed.samples import EmbedSamplesStep
from audit.embed.samples import inputs as embedding_inputs
from audit.errors import InputError
from audit.generate.loading import resolve_numerics
from audit.generate.generate_step import EMBEDDED_WHILE_GENERATING, GenerateStep
from audit.pipeline.detection import detect, join_neighbors
from audit.pipeline.model_workers import run_on_model_workers
from audit.pipeline.pool import WorkerPool, run_tasks
from audit.pipeline.reference import audit_thresholds, prepare_reference
from audit.pipeline.ray_setup import embedding_placement, ray_session
from audit.pipeline.screening import screen_prompts
from audit.plan import ShardSpec, keep_prompts, plan_shard_of, round_ends
from audit.location import Location
from audit.runs import PreparedRun, leased_run, prepare_run
from audit.schema import STATUS_ERROR
from audit.screen.run_screen import (
    escalated_shards,
    escalation_digest,
    screen_complete,
    screen_plan,
    screen_rows,
    write_escalation,
)
from audit.screen.run_screen import funnel as screen_funnel
from audit.step import ShardTask, StepReport, StepSpec
from audit.store import RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditResult:
    """What ``memaudit run`` did, step by step."""

    run_path: Path  # on this machine (the local mirror of an object-store run)
    generation: StepReport
    embeddings: StepReport = field(default_factory=StepReport)
    neighbors: StepReport | None = None  # None: no reference set configured
    detection: StepReport = field(default_factory=StepReport)
    location: str = ""  # the run folder as the user names it: a path or an object-store URI
    screen: StepReport | None = None  # None: the run is not screened
    escalation: dict[str, Any] | None = None  # the screen's funnel (run_screen.funnel); None: not decided
    report: Location | None = None  # report/index.html when run_audit wrote it


def run_audit(cfg: AuditConfig, address: str | None = None, retry_failed: bool = False,
              force: bool = False, wait: bool = False, report: bool = False,
              command: str = "memaudit run") -> AuditResult:
    """Generate every planned sample of the run ``cfg`` describes, embed, join and detect,
    resuming whatever exists, under the run's lease (:mod:`audit.lease`; another driver holding it
    raises :class:`audit.lease.LeaseHeld`, or with ``wait`` is waited for). ``report``: also write
    ``report/`` at the end, under the lease. ``command``: what the lease names its holder as."""
    from audit.embed.models import model_id_of

    prepared = prepare_run(cfg)
    model_id = model_id_of(cfg.embedding)  # a missing embedding model is bad input: refuse before any work
    if cfg.reference.path:
        check_reference(cfg, model_id)
    with ray_session(address or cfg.compute.address):
        # the reference first: a stale calibration is refused before the run folder is touched
        reference = prepare_reference(cfg.reference.path, cfg.compute.lease_ttl_s) if cfg.reference.path else None
        thresholds = audit_thresholds(cfg, reference, model_id)  # may calibrate the reference: before any work
        device, dtype = resolve_numerics(cfg.model, ray.cluster_resources().get("GPU", 0) > 0)
        with leased_run(prepared, device.split(":")[0], dtype, force, wait, command) as (store, lease):
            result = _audit_run(store, prepared, device, dtype, retry_failed, reference, thresholds)
            if report and _has_scores(store):
                from audit.report.build import write_report

                lease.ensure()
                result = replace(result, report=write_report(store.location))
    return result


def _has_scores(store: RunStore) -> bool:
    folder = store.table_dir(layout.PROMPT_SCORES)
    return folder.is_dir() and any(folder.glob("*.parquet"))


def _audit_run(store: RunStore, prepared: PreparedRun, device: str, dtype: str, retry_failed: bool,
               reference: Path | None, thresholds: Thresholds) -> AuditResult:
    """The run's steps in the opened run folder (the screen first when configured)."""
    cfg = prepared.cfg
    plan_shards = prepared.plan.shards()
    shards, screened, funnel, decided = plan_shards, None, None, None
    if cfg.screen is not None:
        screened = screen_prompts(store, prepared, device, dtype)
        store.sync()
        if not screen_complete(store, screen_plan(prepared.plan, cfg.screen)):
            log.warning("screen: %d shards failed; nothing is escalated until they are done (run again)",
                        len(screened.shards_failed))
            return AuditResult(store.path, StepReport(), location=store.location, screen=screened)
        decided = write_escalation(store, cfg, prepared.plan)
        funnel = screen_funnel(decided, cfg.screen)
        log.info("screen: %(escalated)d of %(screened)d prompts escalated to the full audit", funnel)
        shards = escalated_shards(plan_shards, decided)
    audited = _audit_rounds(store, prepared, device, dtype, retry_failed, shards, reference, thresholds, decided)
    store.sync()
    return AuditResult(store.path, *audited, location=store.location, screen=screened, escalation=funnel)


def _audit_rounds(store: RunStore, prepared: PreparedRun, device: str, dtype: str, retry_failed: bool,
                  shards: list[ShardSpec], reference: Path | None, thresholds: Thresholds,
                  decided: pa.Table | None) -> tuple[StepReport, StepReport, StepReport | None, StepReport]:
    """Generation, embeddings, join and detection of ``shards`` (every plan shard, or a screened
    run's escalated prompts), round after round when ``generation.max_samples_per_prompt`` is set
    (docs/screening.md, "Rounds"): each round doubles the samples of the prompts not decided yet.
    Returns the four steps' reports, summed over the rounds run now."""
    cfg = prepared.cfg
    plan_shards = prepared.plan.shards()
    plan_names = [s.name for s in plan_shards]
    ends = round_ends(cfg.generation.samples_per_prompt, cfg.generation.max_samples_per_prompt)
    parts = {s.name: [s.name] for s in shards}
    sizes = {s.name: len(s.prompt_ids) * ends[0] for s in shards}
    screen_only = screen_rows(plan_shards, decided) if decided is not None else None
    digest = escalation_digest(decided) if decided is not None else None
    reports = [StepReport(), StepReport(), None, StepReport()]
    specs, active = shards, {p for s in shards for p in s.prompt_ids}
    for k, end in enumerate(ends):
        if k > 0:
            active = decide_round(store, k - 1, sorted(parts), active, cfg.generation.clean_after_samples)
            specs = keep_prompts(shards, active, k, ends[k - 1], end)
            if not specs:
                break
            log.info("round %d: %d prompts go on to %d samples each", k, len(active), end)
            for spec in specs:
                base = plan_shard_of(spec.name)
                parts[base].append(spec.name)
                sizes[base] += len(spec.prompt_ids) * (end - ends[k - 1])
        generation = generate_samples(store, prepared, device, dtype, retry_failed, specs)
        store.sync()  # other nodes' shards (object-store runs)
        embeddings = embed_samples(store, prepared, generation, specs)
        store.sync()
        names = [name for shard_parts in parts.values() for name in shard_parts]
        joined = join_neighbors(store, cfg, reference, names) if reference is not None else None  # no sync needed
        if k + 1 < len(ends) and read_round(store, k) is not None:
            detected = StepReport()  # decided before (a resumed run): the next round's detection covers it
        else:
            detected = detect(store, cfg, plan_names if decided is not None else list(parts), sizes, thresholds,
                              screen_only, digest, parts)
        store.sync()
        for i, report in enumerate((generation, embeddings, joined, detected)):
            reports[i] = report if reports[i] is None or report is None else reports[i].merged(report)
        if generation.shards_failed or embeddings.shards_failed or detected.shards_failed:
            break  # decide this round only when every shard of it is done (run again)
    return reports[0], reports[1], reports[2], reports[3]  # type: ignore[return-value]


def check_reference(cfg: AuditConfig, model_id: str) -> None:
    """Refuse (before Ray starts) a reference that is unknown or embedded with another model than
    the ``embedding`` section's."""
    from audit.reference.index import INDEX_DIR, load_manifest
    from audit.reference.locate import BUILTIN_PREFIX, builtin_reference_folder, resolve_reference

    if str(cfg.reference.path).startswith(BUILTIN_PREFIX):
        builtin_reference_folder(str(cfg.reference.path))  # an unknown name is refused before Ray starts
        # Every built-in reference (each shipped testbed's training set) is embedded with the copy descriptor.
        if model_id != "builtin:testbed-copy":
            raise InputError(f"reference.path {cfg.reference.path} is embedded with builtin:testbed-copy, but the "
                             f"embedding section gives {model_id}; use embedding.kind: builtin")
        return  # built on first use
    root = resolve_reference(str(cfg.reference.path))  # an object-store reference: mirrored here
    index_model = load_manifest(root / INDEX_DIR)["embedding"]["model_id"]
    if index_model is not None and index_model != model_id:
        raise InputError(f"reference.path {root}: the index was embedded with {index_model} but the embedding "
                         f"section gives {model_id}; use the index's model or re-embed the reference")


def _generation_tasks(store: RunStore, shards: list[ShardSpec], retry_failed: bool,
                      per_prompt: int) -> list[ShardTask]:
    """Missing shards, and with ``retry_failed`` complete shards holding failed rows."""
    removed = store.remove_stale_tmp(layout.SAMPLES)
    if removed:
        log.info("removed %d stale temporary files", removed)
    tasks = []
    for spec in shards:
        units = spec.n_samples(per_prompt)
        if not store.is_complete(layout.SAMPLES, spec.name):
            tasks.append(ShardTask(spec.name, (spec, False), units))
            continue
        marker = store.read_marker(layout.SAMPLES, spec.name) or {}
        if retry_failed and marker.get("status_counts", {}).get(STATUS_ERROR, 0):
            tasks.append(ShardTask(spec.name, (spec, True), units))
    return tasks


def generate_samples(
    store: RunStore, prepared: PreparedRun, device: str, dtype: str, retry_failed: bool = False,
    shards: list[ShardSpec] | None = None,
) -> StepReport:
    """Run the shards of ``samples/`` that are missing (or, with ``retry_failed``, that hold
    failed rows) on a pool of generation workers. ``counts["embedded_while_generating"]``: shards
    whose embeddings the workers wrote too. ``shards``: the samples shards to make (default:
    every plan shard; a screened run passes its escalated prompts' shards)."""
    cfg = prepared.cfg
    shards = prepared.plan.shards() if shards is None else shards
    todo = _generation_tasks(store, shards, retry_failed, cfg.generation.samples_per_prompt)
    if not todo:
        log.info("samples: all %d shards complete; nothing to generate", len(shards))
        return StepReport(shards_total=len(shards), shards_skipped=len(shards))
    settings = {"cfg": cfg, "run": store.where, "lease": store.lease, "device": device, "dtype": dtype,
                "embed": embeds_while_generating(cfg, device)}
    report = run_on_model_workers(cfg, device, StepSpec(GenerateStep, settings), todo, len(shards), "samples",
                                  "generation", "img", "generate")
    report.counts[EMBEDDED_WHILE_GENERATING] = sum(1 for m in report.markers if m.get(EMBEDDED_WHILE_GENERATING))
    return report


def embeds_while_generating(cfg: AuditConfig, device: str) -> bool:
    """Whether the generation workers embed their samples too: unless turned off, or the
    embedding section names another device than the one generating."""
    return cfg.compute.embed_with_generation and cfg.embedding.device in {"auto", device, device.split(":")[0]}


def embed_samples(store: RunStore, prepared: PreparedRun, generation: StepReport | None = None,
                  shards: list[ShardSpec] | None = None) -> StepReport:
    """Embed every complete samples/ shard whose embeddings/ shard is missing or was made by
    another embedding model. Shards the generation workers just embedded count as written, in
    ``counts["embedded_while_generating"]``. ``shards`` as for :func:`generate_samples`."""
    from audit.embed.models import model_id_of

    cfg = prepared.cfg
    model_id = model_id_of(cfg.embedding)
    shards = prepared.plan.shards() if shards is None else shards
    ready = [s.name for s in shards if store.is_complete(layout.SAMPLES, s.name)]
    todo = [n for n in ready if not store.is_current(layout.EMBEDDINGS, n, embedding_inputs(store, n, model_id))]
    just_now = {str(m.get("shard")) for m in (generation.markers if generation else []) if m.get(EMBEDDED_WHILE_GENERATING)}
    fresh = len((just_now & set(ready)) - set(todo))
    if todo:
        device, resources, n_workers = embedding_placement(cfg.embedding.device, cfg.compute.cpus_per_worker)
        settings = {"cfg": cfg, "run": store.where, "lease": store.lease, "device": device}
        pool = WorkerPool(StepSpec(EmbedSamplesStep, settings), resources, "embedding")
        sizes = {s.name: s.n_samples(cfg.generation.samples_per_prompt) for s in shards}
        tasks = [ShardTask(name, name, sizes[name]) for name in todo]
        report = run_tasks(pool, n_workers, tasks, cfg.compute.max_attempts, "img", "embed")
    else:
        report = StepReport()
    report.shards_total = len(shards)
    report.shards_skipped = len(ready) - len(todo) - fresh
    report.shards_written += fresh
    report.counts[EMBEDDED_WHILE_GENERATING] = fresh
    return report
