"""``memaudit reference embed`` on Ray: one task per img2dataset shard, resumable per shard."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from audit.config import AuditConfig
from audit.errors import InputError
from audit.pipeline.pool import ActorPool, ShardTask, StageActor, run_tasks
from audit.pipeline.ray_setup import connect, embedding_placement
from audit.reference.folder import read_embedding_json, shard_complete, write_embedding_json
from audit.reference.sources import SourceShard, fetch, find_shards
from audit.remote import RemoteFolder, is_uri, mirror_path, pull_tree

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class ReferenceEmbedWorker(StageActor):
    """A Ray actor holding one embedding model; it embeds whole img2dataset shards."""

    def __init__(self, cfg: dict[str, Any], out: str, device: str) -> None:
        from audit.embed.stage import EmbedStage

        super().__init__(cfg)
        self.remote = RemoteFolder(out) if is_uri(out) else None  # then publish each shard from the mirror
        self.root = mirror_path(self.remote.uri) if self.remote else Path(out)
        self.stage = EmbedStage(self.cfg.embedding, device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_id": self.stage.model_id}

    def run(self, shard: SourceShard, index: int) -> dict[str, Any]:
        from audit.reference.embed_shard import embed_source_shard

        publish = self._publish if self.remote is not None else None
        return embed_source_shard(self.stage, self.root, fetch(shard), index, publish=publish, pid=os.getpid())

    def _publish(self, files: list[Path], marker: Path, marker_bytes: bytes) -> None:
        """The files, then the marker: a marker in the bucket means a complete shard."""
        assert self.remote is not None
        for path in files:
            self.remote.upload(path, path.relative_to(self.root).as_posix())
        self.remote.write(marker.relative_to(self.root).as_posix(), marker_bytes)


@dataclass
class ReferenceEmbedReport:
    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    embedded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    window_s: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.embedded + sum(self.rejected.values())) / self.window_s if self.window_s else 0.0


def embed_reference(cfg: AuditConfig, source: str | Path, out: str | Path,
                    address: str | None = None) -> ReferenceEmbedReport:
    """Embed an img2dataset output folder into the LAION layout under ``out``; either may be an
    object-store URI (workers then fetch the shards they embed and publish what they write)."""
    from audit.embed.models import describe

    started_at = time.time()
    location = str(out)
    if is_uri(location):
        out = mirror_path(location.rstrip("/"))
        pull_tree(RemoteFolder(location), out)  # what is published already is complete: skipped
    out = Path(out)
    shards = find_shards(source, cfg.reference.input_format)
    model_id = describe(cfg.embedding)
    recorded = read_embedding_json(out)
    if recorded and recorded.get("model_id") != model_id:
        raise InputError(f"{out}: was embedded with {recorded.get('model_id')}, not {model_id}; write to a new "
                         "folder (one reference folder holds one embedding model)")
    todo = [(s, int(s.name)) for s in shards if not shard_complete(out, int(s.name))]
    report = ReferenceEmbedReport(shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    if not todo:
        log.info("reference: all %d shards embedded; nothing to do", len(shards))
        return report
    started = connect(address or cfg.compute.address)
    try:
        device, resources, n_workers = embedding_placement(cfg.embedding.device, cfg.compute.cpus_per_worker)
        pool = ActorPool(ReferenceEmbedWorker, (cfg.to_dict(), location, device), resources, "reference embedding")
        tasks = [ShardTask(f"shard {s.name}", (s, i), 1) for s, i in todo]
        done = run_tasks(pool, min(n_workers, len(tasks)), tasks, cfg.compute.max_attempts, "shard", "embed reference")
    finally:
        if started:
            ray.shutdown()
    for marker in done.markers:
        report.shards_written += 1
        report.embedded += int(marker["embedded"])
        report.rejected.update(marker.get("rejected_by_reason", {}))
    if done.markers:
        write_embedding_json(out, model_id, int(done.markers[0]["dim"]))
        if is_uri(location):
            RemoteFolder(location).upload(out / "embedding.json", "embedding.json")
    report.shards_failed = done.failed
    report.window_s = done.window_s
    report.seconds = time.time() - started_at
    return report
