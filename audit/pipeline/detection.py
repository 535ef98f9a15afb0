"""Detection on Ray: the kNN join (one actor per index shard) and the detection step's workers.

The join fans each batch of sample embeddings out to every index-shard actor (each holds its
shards memory-mapped, loaded once), merges the per-shard top-k with the pure
:func:`audit.reference.search.merge_topk`, and the Ray-free :class:`audit.detect.join.JoinStep`
writes the ``neighbors/`` shards. With fewer actors than index shards, each actor holds several
shards. An actor that dies is restarted with the same shards and the batch is retried. Detection
(cliques, verification, scores) then runs per samples shard on a pool of step workers. Every
output shard records the hashes of its inputs, so a shard is redone when what it was computed
from changed.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from audit import layout
from audit.config import AuditConfig
from audit.detect.join import JoinStep, check_compatible, query_groups
from audit.detect.detect_step import DetectStep, DetectTask, input_tables, settings_inputs
from audit.detect.thresholds import Thresholds
from audit.pipeline.pool import WorkerPool, reason, run_tasks
from audit.pipeline.ray_setup import cpu_actor_resources
from audit.pipeline.reference import prepare_reference
from audit.progress import Progress
from audit.reference.index import INDEX_DIR, load_manifest
from audit.step import ShardTask, StepReport, StepSpec
from audit.store import RunStore

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class IndexShardActor:
    """Holds some index shards (memory-mapped where faiss allows) and searches them."""

    def __init__(self, root: str, shards: list[int], nprobe: int, rerank: int, index_dir: str | None = None,
                 threads: int = 1) -> None:
        import faiss

        from audit.reference.search import ReferenceIndex

        faiss.omp_set_num_threads(max(1, threads))
        self.index = ReferenceIndex(prepare_reference(root), Path(index_dir) if index_dir else None, nprobe=nprobe,
                                    rerank=rerank, only=shards)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from audit.reference.search import merge_topk

        return merge_topk([shard.search(queries, k) for shard in self.index.shards], k)

    def peak_rss_bytes(self) -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def join_neighbors(store: RunStore, cfg: AuditConfig, root: Path, names: list[str]) -> StepReport:
    """Write ``neighbors/`` for every embedded shard whose neighbors are missing or stale
    (``root``: the prepared reference folder; ``counts["queries"]``: samples searched)."""
    manifest = load_manifest(root / INDEX_DIR)
    step = JoinStep(store, cfg.detection.k, root, manifest)
    todo: dict[str, int] = {}
    for name in names:
        marker = store.read_marker(layout.EMBEDDINGS, name)
        if marker is None or not store.is_complete(layout.EMBEDDINGS, name):
            continue
        check_compatible(manifest, marker["model_id"], int(marker["dim"]), f"reference.path {root}")
        if not store.is_current(layout.NEIGHBORS, name, step.inputs(name)):
            todo[name] = int(marker["rows"])
    report = StepReport(shards_total=len(names), shards_skipped=len(names) - len(todo))
    if not todo:
        return report
    location = str(cfg.reference.path)  # a path, a URI or builtin: every actor prepares it on its own node
    shards = [s["shard"] for s in manifest["shards"]]
    args = shard_actor_args(location, None, shards, _join_workers(cfg, len(shards)), cfg.reference.nprobe,
                            cfg.reference.rerank)
    actors = [start_shard_actor(a) for a in args]
    step.search = partial(_fan_out, actors, args, max_attempts=cfg.compute.max_attempts)
    try:
        with Progress("kNN join", "query", sum(todo.values()), tasks=len(todo)) as progress:
            for group in query_groups(todo, cfg.detection.join_batch):
                done = step.run(group)
                report.shards_written += len(group)
                report.counts["queries"] += done["queries"]
                progress.update(done["queries"], tasks=len(group))
    finally:
        for actor in actors:
            ray.kill(actor)
    return report


def _join_workers(cfg: AuditConfig, n_shards: int) -> int:
    if cfg.detection.join_workers != "auto":
        return max(1, min(int(cfg.detection.join_workers), n_shards))
    return max(1, min(n_shards, int(ray.cluster_resources().get("CPU", 1))))


def shard_actor_args(root: str | Path, index_dir: Path | None, shards: list[int], n_actors: int, nprobe: int,
                     rerank: int) -> list[tuple[Any, ...]]:
    """Index shards dealt round-robin to ``n_actors`` actors, the cluster's CPUs split among them."""
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // n_actors)
    return [(str(root), shards[i::n_actors], nprobe, rerank, str(index_dir) if index_dir else None, threads)
            for i in range(n_actors)]


def start_shard_actor(args: tuple[Any, ...]) -> Any:
    """An index-shard actor for ``(root, shards, nprobe, rerank, index_dir, threads)``; it reserves
    as many CPUs as its faiss threads."""
    return IndexShardActor.options(num_cpus=args[5]).remote(*args)


def _fan_out(actors: list[Any], args: list[tuple[Any, ...]], queries: np.ndarray, k: int,
             max_attempts: int) -> tuple[np.ndarray, np.ndarray]:
    """Search every actor at once; a dead actor is restarted with the same shards and asked again."""
    from audit.reference.search import merge_topk

    ref = ray.put(queries)
    pending = {i: actor.search.remote(ref, k) for i, actor in enumerate(actors)}
    attempts = dict.fromkeys(pending, 1)
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    while pending:
        i, future = next(iter(pending.items()))
        try:
            parts[i] = ray.get(future)
            del pending[i]
        except RayActorError as exc:
            if attempts[i] == max_attempts:
                raise RuntimeError(f"index shard actor {i} failed {max_attempts} times: {reason(exc)}") from None
            log.warning("index shard actor %d died (%s); restarting it (attempt %d)", i, reason(exc), attempts[i])
            attempts[i] += 1
            actors[i] = start_shard_actor(args[i])
            pending[i] = actors[i].search.remote(ref, k)
    return merge_topk([parts[i] for i in range(len(actors))], k)


def detect(store: RunStore, cfg: AuditConfig, names: list[str], sizes: dict[str, int],
           thresholds: Thresholds, screened: dict[str, list[dict[str, Any]]] | None = None,
           escalation: str | None = None, parts: dict[str, list[str]] | None = None) -> StepReport:
    """Cliques, verification and prompt scores for every plan shard in ``names`` whose inputs
    changed (the thresholds, resolved once on the driver, are recorded in ``thresholds.json`` and
    in every shard's inputs: a new calibration redoes detection).

    ``parts``: each plan shard's samples shards (its rounds; default: the shard itself). A
    screened run passes the escalation rows of each shard's prompts in ``screened`` and the
    decisions' digest in ``escalation``; a plan shard without parts then holds only prompts the
    screen decided."""
    store.write_json(thresholds.to_json(), layout.THRESHOLDS_JSON)
    extra = settings_inputs(cfg, thresholds)
    if escalation is not None:
        extra["escalation"] = escalation
    tables = input_tables(cfg)
    todo = []
    for name in names:
        shard_parts = (parts or {}).get(name, [name] if screened is None else [])
        if not all(store.is_complete(t, part) for part in shard_parts for t in tables):
            continue
        inputs = store.inputs_of(shard_parts[0] if shard_parts else name, tables if shard_parts else (), extra)
        for part in shard_parts[1:]:  # later rounds (the first keeps the keys of a one-round run)
            inputs.update({f"{t}/{part}": h for t, h in store.inputs_of(part, tables).items()})
        if not store.is_current(layout.PROMPT_SCORES, name, inputs):
            task = DetectTask(name, inputs, tuple(shard_parts), None if screened is None else screened.get(name, []))
            todo.append(ShardTask(name, task, sizes.get(name, 1)))
    if not todo:
        return StepReport(shards_total=len(names), shards_skipped=len(names))
    n_workers = max(1, min(len(todo), int(ray.cluster_resources().get("CPU", 1)) // 2))
    resources = cpu_actor_resources(cfg.compute.cpus_per_worker, n_workers)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        resources["num_gpus"] = min(1.0, gpus / n_workers)  # a GPU share: pairwise tiled L2 runs there
    prepare = partial(prepare_reference, str(cfg.reference.path)) if cfg.reference.path else None
    spec = StepSpec(DetectStep, {"cfg": cfg, "run": store.where, "lease": store.lease, "thresholds": thresholds,
                                 "device": "cuda" if gpus else "cpu"}, prepare)
    report = run_tasks(WorkerPool(spec, resources, "detection"), n_workers, todo, cfg.compute.max_attempts, "img",
                       "detect")
    report.shards_total, report.shards_skipped = len(names), len(names) - len(todo)
    return report
