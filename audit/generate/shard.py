"""One samples/ shard, start to finish (Ray-free; a Ray actor just calls these)."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit.batching import Batch, TwoPhaseStage, run_batches
from audit.config import AuditConfig
from audit.plan import ShardSpec, shard_samples
from audit.schema import SAMPLES, SAMPLES_COMPRESSION, STATUS_OK
from audit.store import RunStore

log = logging.getLogger(__name__)
TABLE = "samples"


def generate_shard(
    stage: TwoPhaseStage, store: RunStore, cfg: AuditConfig, shard: ShardSpec, **extra: Any
) -> dict[str, Any]:
    """Generate every sample of a shard and publish it; returns the completion marker."""
    rows = shard_samples(shard, cfg.generation.samples_per_prompt, cfg.run.seed)
    store.invalidate(TABLE, shard.name)
    with store.open_shard(TABLE, shard.name, SAMPLES, SAMPLES_COMPRESSION) as writer:
        run_batches(stage, rows, writer.write, cfg.compute.batch_size)
        return writer.commit(**extra)


def retry_failed_samples(
    stage: TwoPhaseStage, store: RunStore, cfg: AuditConfig, shard: ShardSpec, **extra: Any
) -> dict[str, Any]:
    """Regenerate the rows of a complete shard whose status is not ``ok``; keep the others."""
    path = store.readable(TABLE, shard.name)
    status = pq.read_table(path, columns=["sample_id", "status"])
    failed = set(status.filter(pc.not_equal(status["status"], STATUS_OK))["sample_id"].to_pylist())
    marker = store.read_marker(TABLE, shard.name) or {}
    if not failed:
        return marker
    rows = shard_samples(shard, cfg.generation.samples_per_prompt, cfg.run.seed)
    keep = [i for i, sid in enumerate(rows["sample_id"]) if sid in failed]
    redo = {k: v[keep] for k, v in rows.items()}
    fresh: dict[str, Batch] = {}

    def collect(output: Batch) -> None:
        for i, sid in enumerate(output["sample_id"]):
            fresh[sid] = {k: v[i : i + 1] for k, v in output.items()}

    run_batches(stage, redo, collect, cfg.compute.batch_size)
    log.info("%s: regenerated %d failed samples", shard.name, len(fresh))
    store.invalidate(TABLE, shard.name)
    with store.open_shard(TABLE, shard.name, SAMPLES, SAMPLES_COMPRESSION) as writer:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            old = pa.Table.from_batches([record_batch]).cast(SAMPLES)
            for part in _merge(old, fresh):
                writer.write(part)
        return writer.commit(**extra, retried=len(fresh))


def _merge(old: pa.Table, fresh: dict[str, Batch]) -> list[pa.Table]:
    """``old`` with the rows whose sample_id is in ``fresh`` replaced, in the same order."""
    parts: list[pa.Table] = []
    start = 0
    ids = old.column("sample_id").to_pylist()
    for i, sid in enumerate(ids):
        if sid in fresh:
            if i > start:
                parts.append(old.slice(start, i - start))
            parts.append(pa.Table.from_pydict(fresh[sid], schema=SAMPLES))
            start = i + 1
    if start < len(ids):
        parts.append(old.slice(start))
    return parts


__all__ = ["TABLE", "generate_shard", "retry_failed_samples"]
