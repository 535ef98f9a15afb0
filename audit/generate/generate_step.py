"""One samples/ shard, start to finish: the generation step (Ray-free; see :mod:`audit.step`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from audit import layout
from audit.batching import Batch, TwoPhaseStage, run_batches
from audit.config import AuditConfig
from audit.embed import samples as embedded_samples
from audit.embed.embedding import EmbedStage
from audit.errors import StorageError, storage_error
from audit.location import Location
from audit.plan import ShardSpec
from audit.schema import SAMPLES, SAMPLES_COMPRESSION, STATUS_OK
from audit.lease import LeaseCheck
from audit.store import RunStore

log = logging.getLogger(__name__)
TABLE = layout.SAMPLES
EMBEDDED_WHILE_GENERATING = "embedded_while_generating"  # key of the returned marker: the embedding model


class GenerateStep:
    """The generation step: one loaded pipeline (and, when ``embed``, the embedding model on the
    same device); a task ``(shard, retry_only)`` generates a whole samples/ shard, or with
    ``retry_only`` regenerates its failed rows."""

    def __init__(self, cfg: AuditConfig, run: Location, device: str, dtype: str, embed: bool,
                 lease: LeaseCheck | None = None) -> None:
        from audit.generate.sampling import GenerateStage

        self.cfg, self.store = cfg, RunStore(run, lease)
        self.stage = GenerateStage(cfg, device, dtype)
        self.embed = EmbedStage(cfg.embedding, device) if embed else None

    def describe(self) -> dict[str, Any]:
        return {"device": self.stage.device, "dtype": self.stage.dtype,
                "embedding": self.embed.model_id if self.embed else None}

    def run(self, task: tuple[ShardSpec, bool]) -> dict[str, Any]:
        shard, retry_only = task
        extra = {"device": self.stage.device, "dtype": self.stage.dtype, "batch_size": self.cfg.compute.batch_size}
        if retry_only:  # merges kept rows with regenerated ones: the embedding step re-embeds the shard
            return retry_failed_samples(self.stage, self.store, self.cfg, shard, **extra)
        return generate_shard(self.stage, self.store, self.cfg, shard, self.embed, **extra)


def generate_shard(
    stage: TwoPhaseStage, store: RunStore, cfg: AuditConfig, shard: ShardSpec,
    embed: EmbedStage | None = None, **extra: Any
) -> dict[str, Any]:
    """Generate every sample of a shard and publish it; returns the completion marker.

    With ``embed``, each batch's pixels are also embedded right after they are generated, and the
    aligned embeddings/ shard is published right after the samples shard, whose marker it names
    as its input; the returned marker then names the embedding model in
    ``embedded_while_generating``."""
    rows = shard.sample_rows(cfg.generation.samples_per_prompt, cfg.run.seed)
    store.invalidate(TABLE, shard.name)
    if embed is None:
        with store.open_shard(TABLE, shard.name, SAMPLES, SAMPLES_COMPRESSION) as writer:
            run_batches(stage, rows, writer.write, cfg.compute.batch_size)
            return writer.commit(**extra)
    store.invalidate(embedded_samples.TABLE, shard.name)
    with (store.open_shard(TABLE, shard.name, SAMPLES, SAMPLES_COMPRESSION) as writer,
          store.open_shard(embedded_samples.TABLE, shard.name, embedded_samples.schema(embed.dim, embed.model_id))
          as embedding_writer):
        tap = _EmbeddingTap(stage, embedded_samples.AlignedEmbeddings(embed, embedding_writer.write),
                            _embeds_in_cpu_phase(embed))
        run_batches(tap, rows, writer.write, cfg.compute.batch_size)
        tap.guarded(tap.aligned.finish)
        marker = writer.commit(**extra)
        tap.guarded(lambda: embedding_writer.commit(**embedded_samples.commit_fields(embed, store, shard.name),
                                                    during="generation"))
        if tap.failure is not None:
            embedding_writer.abort()
            log.warning("%s: embedding while generating failed (%s); the embedding step will embed this shard",
                        shard.name, tap.failure)
            return marker
        return {**marker, EMBEDDED_WHILE_GENERATING: embed.model_id}


def _embeds_in_cpu_phase(embed: EmbedStage) -> bool:
    """Where a batch is embedded: in its CPU phase (helper thread, overlapping the next batch's
    generation) when the embedder runs on an accelerator, so its preprocessing never holds the
    accelerator up; on the generating thread when it runs on the CPU, because two threads running
    torch at once oversubscribe a CPU worker's cores (each brings its own OpenMP team)."""
    return torch.device(embed.embedder.device).type != "cpu"


class _EmbeddingTap:
    """A generation stage that also embeds each batch's pixels (never a PNG round trip), in the
    phase :func:`_embeds_in_cpu_phase` picks; batches reach the embedding in order either way.

    An embedding failure never costs the generated shard: embedding stops for this shard, and the
    run's separate embedding step embeds it from its PNGs. Refused writes still stop the stage."""

    def __init__(self, stage: TwoPhaseStage, aligned: embedded_samples.AlignedEmbeddings, in_cpu_phase: bool) -> None:
        self.stage, self.aligned, self.in_cpu_phase = stage, aligned, in_cpu_phase
        self.failure: str | None = None

    def generate(self, batch: Batch) -> Any:
        raw = self.stage.generate(batch)
        if not self.in_cpu_phase:
            self._embed(batch, raw)
        return raw

    def encode(self, batch: Batch, raw: Any) -> Batch:
        rows = self.stage.encode(batch, raw)
        if self.in_cpu_phase:
            self._embed(batch, raw)
        return rows

    def _embed(self, batch: Batch, raw: Any) -> None:
        # raw.finite is False for every row of a failed batch: the rows encode() marks as errors
        self.guarded(lambda: self.aligned.add(batch["sample_id"], batch["prompt_id"],
                                              embedded_samples.from_pixels(raw.pixels, raw.finite)))

    def guarded(self, work: Callable[[], Any]) -> None:
        """``work()`` unless embedding already failed for this shard; a failure is recorded."""
        if self.failure is not None:
            return
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            if isinstance(exc, StorageError) or storage_error(exc) is not None:
                raise
            log.exception("embedding while generating failed")
            self.failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


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
    rows = shard.sample_rows(cfg.generation.samples_per_prompt, cfg.run.seed)
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


__all__ = ["TABLE", "GenerateStep", "generate_shard", "retry_failed_samples"]
