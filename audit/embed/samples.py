"""The run's ``embeddings/`` table: one shard per samples/ shard, row-aligned with it (Ray-free).

An aligned table rather than a column of ``samples/``: samples shards are final once their
marker is written (their sha256 is in it), so embedding never rewrites image bytes; a second
embedding model is a re-run of this step, not of generation; and analysts join on ``sample_id``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.embed.stage import EmbedStage
from audit.embed.storage import embedding_field, encode_embeddings
from audit.schema import STATUS_ERROR, STATUS_OK
from audit.store import RunStore

TABLE = "embeddings"
SOURCE = "samples"


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


def embed_shard(stage: EmbedStage, store: RunStore, shard: str, **extra: object) -> dict[str, object]:
    """Embed every sample of one complete samples/ shard and publish the aligned shard."""
    source = pq.ParquetFile(store.readable(SOURCE, shard))
    store.invalidate(TABLE, shard)
    with store.open_shard(TABLE, shard, schema(stage.dim, stage.model_id)) as writer:
        columns = ["sample_id", "prompt_id", "image_png", "status"]
        for batch in source.iter_batches(batch_size=stage.section.batch_size, columns=columns):
            rows = batch.to_pydict()
            generated = [s == STATUS_OK for s in rows["status"]]
            images = np.array([img if ok else None for img, ok in zip(rows["image_png"], generated)], dtype=object)
            out = stage({"image": images})
            errors = [None if ok and e is None else (e or "no image: generation failed for this sample")
                      for ok, e in zip(generated, out["error"])]
            writer.write(pa.table({
                "sample_id": rows["sample_id"],
                "prompt_id": rows["prompt_id"],
                "embedding": encode_embeddings(out["embedding"]),
                "status": [STATUS_ERROR if e else STATUS_OK for e in errors],
                "error": errors,
            }))
        return writer.commit(model_id=stage.model_id, dim=stage.dim,
                             inputs=inputs(store, shard, stage.model_id), **extra)
