"""Detection on Ray: the kNN join (one actor per index shard) and per-shard detection actors.

The join fans each batch of sample embeddings out to every index-shard actor (each holds its
shards memory-mapped, loaded once), merges the per-shard top-k with the pure
:func:`audit.reference.search.merge_topk` and writes ``neighbors/`` shards. With fewer actors than
index shards, each actor holds several shards. An actor that dies is restarted with the same
shards and the batch is retried. Detection (cliques, verification, scores) then runs per samples
shard on a pool of CPU actors. Every output shard records the hashes of its inputs, so a shard is
redone when what it was computed from changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.exceptions import RayActorError

from audit.config import AuditConfig
from audit.detect.join import check_compatible, neighbor_table, query_groups, shard_of_rows
from audit.detect.shard import MATCHES_TABLE, SCORES_TABLE
from audit.embed.storage import decode_embeddings
from audit.pipeline.pool import ActorPool, ShardTask, StageActor, reason, run_tasks
from audit.pipeline.ray_setup import cpu_actor_resources
from audit.progress import Progress
from audit.reference.builtin import resolve_reference
from audit.reference.index import INDEX_DIR, load_manifest
from audit.store import RunStore

log = logging.getLogger(__name__)
NEIGHBORS_TABLE = "neighbors"


@ray.remote(max_restarts=0)
class IndexShardActor:
    """Holds some index shards (memory-mapped where faiss allows) and searches them."""

    def __init__(self, root: str, shards: list[int], nprobe: int, rerank: int, index_dir: str | None = None,
                 threads: int = 1) -> None:
        import faiss

        from audit.reference.search import ReferenceIndex

        faiss.omp_set_num_threads(max(1, threads))
        self.index = ReferenceIndex(resolve_reference(root), Path(index_dir) if index_dir else None, nprobe=nprobe,
                                    rerank=rerank, only=shards)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from audit.reference.search import merge_topk

        return merge_topk([shard.search(queries, k) for shard in self.index.shards], k)

    def peak_rss_bytes(self) -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@ray.remote(max_restarts=0)
class DetectWorker(StageActor):
    def __init__(self, cfg: dict[str, Any], run_path: str) -> None:
        from audit.detect.shard import Detector

        super().__init__(cfg)
        ref = resolve_reference(str(self.cfg.reference.path)) if self.cfg.reference.path else None
        manifest = load_manifest(ref / INDEX_DIR) if ref else None
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # a GPU share: pairwise tiled L2 runs there
        self.detector = Detector(self.cfg, RunStore(run_path), ref, manifest, device=device)

    def run(self, shard: str, inputs: dict[str, str]) -> dict[str, Any]:
        return self.detector.run(shard, pid=os.getpid(), inputs=inputs)


def manifest_hash(root: Path) -> str:
    return hashlib.sha256((root / INDEX_DIR / "manifest.json").read_bytes()).hexdigest()[:16]


def join_neighbors(store: RunStore, cfg: AuditConfig, names: list[str]) -> dict[str, Any]:
    """Write ``neighbors/`` for every embedded shard whose neighbours are missing or stale."""
    location = str(cfg.reference.path)  # a path or a URI: every actor mirrors a URI on its own node
    root = resolve_reference(location)
    manifest = load_manifest(root / INDEX_DIR)
    ref_hash = {"index": manifest_hash(root), "k": str(cfg.detection.k)}
    todo: dict[str, int] = {}
    for name in names:
        marker = store.read_marker("embeddings", name)
        if marker is None or not store.is_complete("embeddings", name):
            continue
        check_compatible(manifest, marker["model_id"], int(marker["dim"]), f"reference.path {root}")
        if not store.is_current(NEIGHBORS_TABLE, name, store.inputs_of(name, ("embeddings",), ref_hash)):
            todo[name] = int(marker["rows"])
    report = {"shards_written": 0, "shards_skipped": len(names) - len(todo), "queries": 0}
    if not todo:
        return report
    shards = [s["shard"] for s in manifest["shards"]]
    args = shard_actor_args(location, None, shards, _join_workers(cfg, len(shards)), cfg.reference.nprobe,
                            cfg.reference.rerank)
    from audit.reference.images import ReferenceImages

    joiner = _Joiner(store, cfg, manifest, ref_hash, ReferenceImages(root, manifest), args)
    try:
        with Progress("kNN join", "query", sum(todo.values()), tasks=len(todo)) as progress:
            for group in query_groups(todo, cfg.detection.join_batch):
                queries = joiner.join(group)
                report["shards_written"] += len(group)
                report["queries"] += queries
                progress.update(queries, tasks=len(group))
    finally:
        joiner.close()
    return report


class _Joiner:
    """The shard actors of one join and the writing of ``neighbors/`` shards."""

    def __init__(self, store: RunStore, cfg: AuditConfig, manifest: dict[str, Any], ref_hash: dict[str, str],
                 keys: Any, args: list[tuple[Any, ...]]) -> None:
        self.store, self.cfg, self.manifest, self.ref_hash, self.keys, self.args = store, cfg, manifest, ref_hash, keys, args
        self.actors = [start_shard_actor(a) for a in args]

    def join(self, group: list[str]) -> int:
        """Neighbours of every sample of the shards in ``group`` (one fan-out); returns the queries."""
        sample_ids, prompt_ids, queries, owners = [], [], [], []
        for name in group:
            table = pq.read_table(self.store.readable("embeddings", name))
            dim = int(table.schema.field("embedding").metadata[b"dim"])
            sample_ids += table.column("sample_id").to_pylist()
            prompt_ids += table.column("prompt_id").to_pylist()
            queries.append(decode_embeddings(table.column("embedding"), dim).astype(np.float32))
            owners += [name] * table.num_rows
        q = np.concatenate(queries)
        scores, rows = _fan_out(self.actors, self.args, q, self.cfg.detection.k, self.cfg.compute.max_attempts)
        rows[~(np.linalg.norm(q, axis=1) > 0)] = -1  # samples without an embedding get no neighbours
        owner = np.array(owners)
        for name in group:
            sel = np.flatnonzero(owner == name)
            table = neighbor_table([sample_ids[i] for i in sel], [prompt_ids[i] for i in sel], scores[sel],
                                   rows[sel], self.keys.keys(rows[sel]), shard_of_rows(self.manifest, rows[sel]))
            self.store.invalidate(NEIGHBORS_TABLE, name)
            with self.store.open_shard(NEIGHBORS_TABLE, name, table.schema) as writer:
                writer.write(table)
                writer.commit(inputs=self.store.inputs_of(name, ("embeddings",), self.ref_hash), queries=int(sel.size))
        return int(q.shape[0])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


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


def detect(store: RunStore, cfg: AuditConfig, names: list[str], sizes: dict[str, int]) -> dict[str, Any]:
    """Cliques, verification and prompt scores for every shard whose inputs changed."""
    extra = {"detection": hashlib.sha256(json.dumps(cfg.detection.model_dump(mode="json"), sort_keys=True)
                                         .encode()).hexdigest()[:16]}
    tables = ("samples", "embeddings", NEIGHBORS_TABLE) if cfg.reference.path else ("samples", "embeddings")
    todo = []
    for name in names:
        if not all(store.is_complete(t, name) for t in tables):
            continue
        inputs = store.inputs_of(name, tables, extra)
        if not store.is_current(SCORES_TABLE, name, inputs):
            todo.append(ShardTask(name, (name, inputs), sizes.get(name, 1)))
    report: dict[str, Any] = {"shards_written": 0, "shards_skipped": len(names) - len(todo), "failed": {}}
    if not todo:
        return report
    n_workers = max(1, min(len(todo), int(ray.cluster_resources().get("CPU", 1)) // 2))
    resources = cpu_actor_resources(cfg.compute.cpus_per_worker, n_workers)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        resources["num_gpus"] = min(1.0, gpus / n_workers)
    pool = ActorPool(DetectWorker, (cfg.to_dict(), store.location), resources, "detection")
    done = run_tasks(pool, n_workers, todo, cfg.compute.max_attempts, "img", "detect")
    report["shards_written"] = len(done.markers)
    report["failed"] = done.failed
    return report


__all__ = ["MATCHES_TABLE", "NEIGHBORS_TABLE", "SCORES_TABLE", "detect", "join_neighbors"]
