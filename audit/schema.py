"""Arrow schemas of the run's tables (documented column by column in docs/schema.md)."""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("n_occurrences", pa.int32(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("url", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("image_png", pa.binary()),
        pa.field("thumb_png", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("noise_magnitude", pa.float32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

# PNG bytes are already compressed: compressing them again costs CPU and saves nothing.
SAMPLES_COMPRESSION = {
    name: ("none" if name in {"image_png", "thumb_png"} else "zstd") for name in SAMPLES.names
}

NEIGHBORS = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)

MATCHES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("own", pa.bool_(), nullable=False),
        pa.field("tiled_l2", pa.float32()),
        pa.field("rms", pa.float32()),
        pa.field("cosine", pa.float32()),
        pa.field("split_product", pa.float32()),
        pa.field("structure_sum", pa.float32()),
        pa.field("label", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

PROMPT_SCORES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("n_samples", pa.int32(), nullable=False),
        pa.field("noise_magnitude", pa.float32()),
        pa.field("clique_size", pa.int32(), nullable=False),
        pa.field("clique_exact", pa.bool_(), nullable=False),
        pa.field("clique_upper", pa.int32(), nullable=False),
        pa.field("clique_min", pa.int32(), nullable=False),
        pa.field("best_cosine", pa.float32()),
        pa.field("best_split_product", pa.float32()),
        pa.field("min_tiled_l2", pa.float32()),
        pa.field("n_matching", pa.int32(), nullable=False),
        pa.field("n_retrieved", pa.int32(), nullable=False),
        pa.field("n_template", pa.int32(), nullable=False),
        pa.field("n_low_information", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("p_value", pa.float64(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        # Screened runs only (null otherwise): the screen's signals and decision (docs/screening.md)
        pa.field("screen_score", pa.float32()),
        pa.field("screen_noise_magnitude", pa.float32()),
        pa.field("screen_alignment", pa.float32()),
        pa.field("screen_latent_update", pa.float32()),
        pa.field("escalated", pa.bool_()),
        pa.field("escalation", pa.string()),
    ]
)

SCREEN = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("n_seeds", pa.int32(), nullable=False),
        pa.field("noise_magnitude", pa.float32()),
        pa.field("alignment", pa.float32()),
        pa.field("noise_magnitude_seeds", pa.list_(pa.float32())),
        pa.field("alignment_seeds", pa.list_(pa.float32())),
        pa.field("latent_update", pa.float32()),  # screen.steps > 1 only
        pa.field("latent_update_seeds", pa.list_(pa.float32())),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)

ESCALATION = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("noise_magnitude", pa.float32()),
        pa.field("alignment", pa.float32()),
        pa.field("z_noise_magnitude", pa.float32()),
        pa.field("z_alignment", pa.float32()),
        pa.field("latent_update", pa.float32()),
        pa.field("z_latent_update", pa.float32()),
        pa.field("screen_score", pa.float32()),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("escalated", pa.bool_(), nullable=False),
        pa.field("escalation", pa.string()),
    ]
)

ROUND = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("n_samples", pa.int32(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),  # memorized, clean or continue
        pa.field("reason", pa.string(), nullable=False),
    ]
)
