"""The sections of the run config: one frozen pydantic model per top-level YAML key.

Each section holds one concern (where the run is written, the checkpoint, the prompts, sampling,
compute, the embedding model, the reference index, detection); :class:`audit.config.AuditConfig`
assembles them and :func:`audit.config.load_config` reads them from YAML. They live here, apart
from the loading machinery, so the list of settings, their defaults and their descriptions can be
read in one place. Import them from :mod:`audit.config`, which re-exports every one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from audit.ids import MAX_SAMPLES_PER_PROMPT

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_PARTITION_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Section(BaseModel):
    """Base of every config model: unknown keys are errors (a typo must not be silently
    ignored), values are frozen (a run's config cannot drift after it is recorded) and defaults
    are validated like user values."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_device(value: str) -> str:
    """Accept a torch device spelling memaudit can resolve; the error lists the allowed forms."""
    if not _DEVICE.match(value):
        raise ValueError(f"{value!r} is not allowed; allowed values: auto, cpu, cuda, cuda:N, mps")
    return value


def _partition_value(value: str | None, key: str) -> str | None:
    """Accept ``None`` or a value usable as a ``key=value`` folder name in the run layout
    (see docs/schema.md): no separators, no leading dot, nothing a shell or object store mangles."""
    if value is not None and not _PARTITION_VALUE.match(value):
        raise ValueError(
            f"{key} must be letters, digits, '.', '_' or '-' (it names a folder), got {value!r}"
        )
    return value


def _positive_or_auto(value: int | str) -> int | str:
    """Accept ``'auto'`` (the literal type already restricts strings) or a count above zero."""
    if isinstance(value, int) and value <= 0:
        raise ValueError("must be > 0 or 'auto'")
    return value


class RunSection(Section):
    """Where the run is written and what identifies it."""

    root: str = Field("memaudit-runs", description="Folder (or object-store URI, e.g. s3://bucket/runs) "
                                                   "holding model=/checkpoint=/run= trees.")
    model_name: str | None = Field(None, description="model=<name>; default: the checkpoint folder name.")
    checkpoint_id: str | None = Field(None, description="checkpoint=<id>; default: content hash prefix.")
    run_id: str | None = Field(None, description="run=<id>; default: hash of what determines results.")
    seed: int = Field(0, ge=0, description="Run seed; every sample's seed derives from it.")

    @field_validator("model_name", "checkpoint_id", "run_id")
    @classmethod
    def _folder_safe(cls, value: str | None, info: Any) -> str | None:
        return _partition_value(value, info.field_name)


class LoraAdapter(Section):
    """One LoRA adapter applied on top of the checkpoint (docs/model_families.md, "LoRA")."""

    path: str = Field(description="A .safetensors LoRA file (diffusers/peft format), a folder holding one, "
                                  "or builtin:testbed-lora.")
    scale: float = Field(1.0, description="Adapter weight passed to set_adapters.")


class ModelSection(Section):
    """The text-to-image checkpoint and how to load it."""

    path: str = Field("builtin:testbed", description="diffusers folder (or its object-store URI), hub id, or builtin:<name>.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    scheduler: str | None = Field(None, description="diffusers scheduler class, e.g. DDIMScheduler.")
    allow_pickle: bool = Field(False, description="Allow pickle-based (.bin/.ckpt) weights.")
    safety_checker: bool = Field(False, description="Keep the pipeline's safety checker (blanks images).")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the denoiser (GPU; slow first batch).")
    lora: tuple[LoraAdapter, ...] = Field(
        (), description="LoRA adapters [{path, scale}]; each one's content hash joins the checkpoint identity."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)


class PromptsSection(Section):
    """Where prompts come from."""

    source: str = Field("builtin:testbed", description="txt/jsonl/parquet file, folder, or builtin:<name>.")
    format: Literal["auto", "txt", "jsonl", "parquet", "most_duplicated"] = Field(
        "auto", description="most_duplicated: source is a reference folder; its captions, most duplicated first."
    )
    text_column: str = Field("caption", description="Caption column of JSONL/Parquet sources.")
    limit: int | None = Field(None, gt=0, description="Use the first N distinct prompts.")


class GenerationSection(Section):
    """Sampling settings; each of them changes the pixels (and so the run id)."""

    samples_per_prompt: int = Field(4, gt=0, le=MAX_SAMPLES_PER_PROMPT)
    steps: int = Field(50, gt=0, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="CFG scale; <= 1 disables CFG.")
    negative_prompt: str = ""
    height: int | None = Field(None, gt=0, description="Pixels; default: the model's own size.")
    width: int | None = Field(None, gt=0)
    noise_magnitude_steps: int = Field(
        1, gt=0, description="K: Wen et al.'s noise magnitude is averaged over the first K steps."
    )
    noise_magnitude_extra_uncond: bool = Field(
        False, description="Models without CFG (Flux): one extra unconditional denoiser call at each of the "
                           "first K steps, so the noise magnitude can be measured."
    )
    thumbnail_size: int = Field(128, ge=0, description="Longest thumbnail side; 0: no thumbnails.")
    png_compress_level: int = Field(6, ge=0, le=9)
    prompts_per_shard: int = Field(4, gt=0, description="Prompts per samples/ shard (unit of resume).")
    max_samples_per_prompt: int | None = Field(
        None, gt=0, le=MAX_SAMPLES_PER_PROMPT,
        description="Adaptive rounds: samples_per_prompt is the first round, each next round doubles a prompt's "
                    "samples up to this, for prompts neither memorized nor clean yet (docs/screening.md); null: one round.")
    clean_after_samples: int = Field(
        16, gt=0, description="Rounds: a prompt with no evidence of any kind (no labelled pair, no two samples alike) "
                              "in at least this many samples is decided clean and stops.")

    @model_validator(mode="after")
    def _rounds(self) -> GenerationSection:
        if self.max_samples_per_prompt is not None and self.max_samples_per_prompt < self.samples_per_prompt:
            raise ValueError(f"max_samples_per_prompt ({self.max_samples_per_prompt}) is below samples_per_prompt "
                             f"({self.samples_per_prompt}), the first round; raise it or remove it")
        return self


class ComputeSection(Section):
    """Where and how fast; none of it changes the pixels."""

    address: str | None = Field(None, description="Ray address to join (host:port, ray://, auto); default: "
                                 "$RAY_ADDRESS, else a private local Ray.")
    num_workers: int | Literal["auto"] = Field("auto", description="Generation actors; auto: #GPUs or 1.")
    gpus_per_worker: float = Field(1.0, gt=0, description="Used when the cluster has GPUs.")
    cpus_per_worker: int | Literal["auto"] = Field("auto", description="auto: 1 with GPUs, else CPUs/workers.")
    batch_size: int = Field(8, gt=0, description="Images per denoiser forward (CFG doubles it).")
    max_attempts: int = Field(3, gt=0, description="Tries per shard when a worker dies.")
    lease_ttl_s: float = Field(
        300.0, gt=0, description="Object-store runs and references: a writer's lease not renewed for this long "
        "(renewed every tenth of it) is taken over by the next driver (docs/architecture.md, Leases)."
    )
    embed_with_generation: bool = Field(
        True, description="Generation workers embed each batch on their device as it is generated "
        "(no PNG decode, no second pass); false, or embedding.device naming another device: a separate step after."
    )

    @field_validator("num_workers", "cpus_per_worker")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        return _positive_or_auto(value)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbeddingSection(Section):
    """The image embedding model used for generated samples and reference images alike."""

    kind: Literal["builtin", "open_clip", "torchscript"] = Field(
        "builtin", description="builtin, open_clip (CLIP models) or torchscript (copy detectors such as SSCD)."
    )
    model: str = Field(
        "testbed-copy",
        description="builtin name; open_clip model name (ViT-L-14, local-dir:/path); TorchScript file.",
    )
    pretrained: str | None = Field(None, description="open_clip pretrained tag or weights file.")
    image_size: int = Field(224, gt=0, description="TorchScript input side in pixels (SSCD: 288).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="TorchScript input normalisation.")
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = Field(64, gt=0, description="Images per embedding forward.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Larger images are refused (bomb guard).")
    allow_pickle: bool = Field(False, description="Allow pickle-based open_clip weight files.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)


class ReferenceSection(Section):
    """The training-set side: embedding folder, faiss index recipe, duplicate counting."""

    path: str | None = Field(None, description="Reference folder or URI (img_emb/, metadata/, index/), builtin:testbed, or null.")
    input_format: Literal["auto", "webdataset", "parquet"] = Field(
        "auto", description="img2dataset output format read by `reference embed`."
    )
    images_per_shard: int = Field(10_000, gt=0, description="Rows per img_emb/metadata file written.")
    index_factory: str = Field(
        "auto", description="faiss factory string; auto: Flat up to flat_max_vectors, else IVF{nlist},SQ8."
    )
    flat_max_vectors: int = Field(1_000_000, gt=0, description="auto uses an exact index up to this size.")
    vectors_per_shard: int = Field(2_000_000, gt=0, description="Vectors per faiss index shard.")
    train_sample: int = Field(200_000, gt=0, description="Vectors sampled to train the index (once, shared by all shards).")
    nprobe: int = Field(16, gt=0, description="IVF lists searched per query.")
    rerank: int = Field(3, ge=1, description="Approximate indexes: exact re-rank of k x rerank candidates (1: none).")
    dup_threshold: float = Field(0.95, gt=0, le=1, description="Cosine at which two images are duplicates.")
    calibration_sample: int = Field(1000, ge=100, description="Training images whose nearest distinct images "
                                                             "make the calibration's null (`reference calibrate`).")


class DetectionSection(Section):
    """Turning samples and the reference index into evidence; defaults from the papers."""

    k: int = Field(10, gt=0, description="Reference neighbors kept per sample.")
    join_batch: int = Field(4096, ge=1, description="Queries per faiss call (>= 256 reaches GEMM speed).")
    join_workers: int | Literal["auto"] = Field("auto", description="Index shard actors; auto: one per shard, at most the CPUs.")
    tile_grid: int = Field(4, gt=0, description="Carlini's tiled L2: tiles per side.")
    clique_delta: float = Field(0.15, gt=0, description="Tiled L2 under which two samples are the same.")
    clique_min: int | Literal["auto"] = Field(
        "auto", description="Clique size that flags a prompt; auto: 10 per 500 samples (Carlini), at least 3."
    )
    split_chunks: int = Field(16, gt=0, description="Somepalli's split-product chunks.")
    verify_top: int = Field(3, gt=0, description="Neighbors per sample verified on pixels.")
    verify_size: int = Field(256, gt=0, description="Largest side at which pixel distances are computed.")
    calibration: Literal["calibrated", "paper"] = Field(
        "calibrated", description="calibrated: thresholds are false-label rates on the reference's own train->train "
        "null (`memaudit reference calibrate`); paper: the absolute constants match_l2 / template_similarity."
    )
    match_fpr: float = Field(1e-3, gt=0, lt=0.5, description="Calibrated: share of distinct training images "
                                                             "that would pass as pixel copies (sets the tiled-L2 threshold).")
    template_fpr: float = Field(1e-2, gt=0, lt=0.5, description="Calibrated: share of distinct training images "
                                                               "that would pass as template copies (split-product threshold).")
    match_l2: float = Field(0.15, gt=0, description="Paper mode: tiled L2 of a verified copy (Carlini's extraction).")
    template_similarity: float = Field(
        0.5, gt=0, le=1, description="Paper mode: copy similarity above which a non-matching pair is a layout copy (Somepalli)."
    )
    flag_fpr: float = Field(1e-3, gt=0, lt=1, description="False-flag rate per prompt of the flag test (false labels "
                                                         "alone flag a prompt at most this often, at any sample count).")

    @field_validator("join_workers", "clique_min")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        return _positive_or_auto(value)


class ScreenSection(Section):
    """Screening every prompt for a few denoiser calls before the full audit (docs/screening.md);
    present in the config = on. Every key joins the run identity."""

    seeds: int = Field(4, gt=0, le=MAX_SAMPLES_PER_PROMPT, description="Initial noises per prompt (the seeds of "
                                                                      "its first samples).")
    steps: int = Field(1, gt=0, description="Huang et al.: above 1, the norms of the latent updates over the first "
                                            "`steps` sampler steps join the score (steps - 1 more CFG calls per seed).")
    prompts_per_shard: int = Field(256, gt=0, description="Prompts per screen/ shard (unit of resume).")
    threshold: float | None = Field(
        2.0, description="Escalate prompts whose screen_score (mean robust z-score of the signals against the "
        "run's own prompts) is at least this; null: only screen.top escalates.")
    top: int | float | None = Field(
        None, description="Also escalate the highest-scoring prompts: a count (e.g. 1000) or a fraction (0 < f <= 1).")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: float | None) -> float | None:
        if value is not None and not (value > 0 and value < float("inf")):
            raise ValueError(f"must be a finite number above 0, the run's median prompt (got {value!r}); a "
                             "screen_score is in robust standard deviations above it; to escalate every prompt use "
                             "screen.top: 1.0")
        return value

    @field_validator("top", mode="before")
    @classmethod
    def _not_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a count or a fraction, not a boolean")
        return value

    @field_validator("top")
    @classmethod
    def _top(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"a count must be >= 1 (got {value})")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"a fraction must be in (0, 1] (got {value}); give a count as an integer")
        return value
