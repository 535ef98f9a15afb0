"""The run's ``embeddings/`` table: one shard per samples/ shard, row-aligned with it (Ray-free).

An aligned table rather than a column of ``samples/``: samples shards are final once their
marker is written (their sha256 is in it), so embedding never rewrites image bytes; a second
embedding model is a re-run of this step, not of generation; and analysts join on ``sample_id``.

A shard is embedded either while it is generated (:class:`AlignedEmbeddings` fed with the pixels
as they leave the generation stage, see :mod:`audit.generate.generate_step`) or afterwards from its PNG
bytes (:func:`embed_shard`). Both group rows the same way, so they write the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from audit import layout
from audit.config import AuditConfig
from audit.embed.decode import Decoded, decode_image
from audit.embed.embedding import EmbedStage
from audit.embed.storage import embedding_field, encode_embeddings
from audit.location import Location
from audit.schema import STATUS_ERROR, STATUS_OK
from audit.lease import LeaseCheck
from audit.store import RunStore

TABLE = layout.EMBEDDINGS
SOURCE = layout.SAMPLES
NOT_GENERATED = "no image: generation failed for this sample"


def schema(dim: int, model_id: str) -> pa.Schema:
    return pa.schema([
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        embedding_field("embedding", dim, model_id),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ], metadata={"model_id": model_id, "dim": str(dim)})


def inputs(store: RunStore, shard: str, model_id: str) -> dict[str, str]:
    """The samples shard it is made from and the model: a changed model, a regenerated or retried
    samples shard re-embeds."""
    return store.inputs_of(shard, (SOURCE,), {"model_id": model_id})


class AlignedEmbeddings:
    """Embeds a shard's sample rows in order, ``embedding.batch_size`` rows per forward, and hands
    each group's embeddings/ rows to ``sink``.

    The grouping depends on row positions only (not on how the rows arrive), so a shard embedded
    from the generator's pixels and the same shard embedded later from its PNGs (lossless: the
    same pixels) run the same forwards on the same inputs.
    """

    def __init__(self, stage: EmbedStage, sink: Callable[[pa.Table], None]) -> None:
        self.stage, self.sink = stage, sink
        self._ids: list[str] = []
        self._prompts: list[str] = []
        self._decoded: list[Decoded] = []

    def add(self, sample_ids: Sequence[str], prompt_ids: Sequence[str], decoded: Sequence[Decoded]) -> None:
        self._ids.extend(sample_ids)
        self._prompts.extend(prompt_ids)
        self._decoded.extend(decoded)
        size = self.stage.section.batch_size
        while len(self._decoded) >= size:
            self._emit(size)

    def finish(self) -> None:
        """Embed the rows still waiting for a full group."""
        if self._decoded:
            self._emit(len(self._decoded))

    def _emit(self, n: int) -> None:
        ids, prompts, decoded = self._ids[:n], self._prompts[:n], self._decoded[:n]
        del self._ids[:n], self._prompts[:n], self._decoded[:n]
        out = self.stage.embed_decoded(decoded)
        errors = list(out["error"])
        self.sink(pa.table({
            "sample_id": ids,
            "prompt_id": prompts,
            "embedding": encode_embeddings(out["embedding"]),
            "status": [STATUS_ERROR if e else STATUS_OK for e in errors],
            "error": errors,
        }))


def from_pixels(pixels: np.ndarray | None, usable: Sequence[bool]) -> list[Decoded]:
    """Rows of generated NHWC uint8 pixels as the embedding stage's input (no PNG round trip);
    rows not ``usable`` (failed or non-finite) have no image."""
    decoded: list[Decoded] = []
    for i, ok in enumerate(usable):
        if not ok or pixels is None:
            decoded.append(Decoded(None, NOT_GENERATED))
            continue
        height, width = pixels.shape[1:3]
        decoded.append(Decoded(Image.fromarray(pixels[i]), None, None, width, height))
    return decoded


def embed_shard(stage: EmbedStage, store: RunStore, shard: str, **extra: object) -> dict[str, object]:
    """Embed every sample of one complete samples/ shard and publish the aligned shard."""
    source = pq.ParquetFile(store.readable(SOURCE, shard))
    store.invalidate(TABLE, shard)
    with store.open_shard(TABLE, shard, schema(stage.dim, stage.model_id)) as writer:
        aligned = AlignedEmbeddings(stage, writer.write)
        columns = ["sample_id", "prompt_id", "image_png", "status"]
        limit = stage.section.max_image_pixels
        for batch in source.iter_batches(batch_size=stage.section.batch_size, columns=columns):
            rows = batch.to_pydict()
            decoded = [decode_image(png, limit) if state == STATUS_OK else Decoded(None, NOT_GENERATED)
                       for png, state in zip(rows["image_png"], rows["status"])]
            aligned.add(rows["sample_id"], rows["prompt_id"], decoded)
        aligned.finish()
        return writer.commit(**commit_fields(stage, store, shard), **extra)


class EmbedSamplesStep:
    """The sample-embedding step: one embedding model; a task (a shard name) embeds that complete
    samples/ shard from its PNGs (shards not embedded while they were generated)."""

    def __init__(self, cfg: AuditConfig, run: Location, device: str, lease: LeaseCheck | None = None) -> None:
        self.store = RunStore(run, lease)
        self.stage = EmbedStage(cfg.embedding, device)

    def describe(self) -> dict[str, object]:
        return {"model_id": self.stage.model_id}

    def run(self, task: str) -> dict[str, object]:
        return embed_shard(self.stage, self.store, task)


def commit_fields(stage: EmbedStage, store: RunStore, shard: str) -> dict[str, object]:
    """What an embeddings/ marker records besides the shard itself (call after the samples
    shard's marker exists: its sha256 is one of the inputs)."""
    return {"model_id": stage.model_id, "dim": stage.dim, "inputs": inputs(store, shard, stage.model_id)}
