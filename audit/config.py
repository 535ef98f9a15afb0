"""The run configuration: one typed, frozen object loaded from YAML.

Unknown keys are rejected and every error names the key path and the allowed values, in one line.
Relative paths in a config file are resolved against the directory of that file, so a config and
the files it names can be moved together. The whole config is frozen into each run's ``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from audit.errors import ConfigError
from audit.ids import MAX_SAMPLES_PER_PROMPT

DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "audit.yaml"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_PARTITION_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"{value!r} is not allowed; allowed values: auto, cpu, cuda, cuda:N, mps")
    return value


def _partition_value(value: str | None, key: str) -> str | None:
    if value is not None and not _PARTITION_VALUE.match(value):
        raise ValueError(
            f"{key} must be letters, digits, '.', '_' or '-' (it names a folder), got {value!r}"
        )
    return value


class RunSection(_Section):
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


class ModelSection(_Section):
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

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)


class PromptsSection(_Section):
    """Where prompts come from."""

    source: str = Field("builtin:testbed", description="txt/jsonl/parquet file, folder, or builtin:<name>.")
    format: Literal["auto", "txt", "jsonl", "parquet", "most_duplicated"] = Field(
        "auto", description="most_duplicated: source is a reference folder; its captions, most duplicated first."
    )
    text_column: str = Field("caption", description="Caption column of JSONL/Parquet sources.")
    limit: int | None = Field(None, gt=0, description="Use the first N distinct prompts.")


class GenerationSection(_Section):
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
    thumbnail_size: int = Field(128, ge=0, description="Longest thumbnail side; 0: no thumbnails.")
    png_compress_level: int = Field(6, ge=0, le=9)
    prompts_per_shard: int = Field(4, gt=0, description="Prompts per samples/ shard (unit of resume).")


class ComputeSection(_Section):
    """Where and how fast; none of it changes the pixels."""

    address: str | None = Field(None, description="Ray address to join; default: start a local Ray.")
    num_workers: int | Literal["auto"] = Field("auto", description="Generation actors; auto: #GPUs or 1.")
    gpus_per_worker: float = Field(1.0, gt=0, description="Used when the cluster has GPUs.")
    cpus_per_worker: int | Literal["auto"] = Field("auto", description="auto: 1 with GPUs, else CPUs/workers.")
    batch_size: int = Field(8, gt=0, description="Images per denoiser forward (CFG doubles it).")
    max_attempts: int = Field(3, gt=0, description="Tries per shard when a worker dies.")
    embed_with_generation: bool = Field(
        True, description="Generation workers embed each batch on their device as it is generated "
        "(no PNG decode, no second pass); false, or embedding.device naming another device: a separate step after."
    )

    @field_validator("num_workers", "cpus_per_worker")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbeddingSection(_Section):
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


class ReferenceSection(_Section):
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


class DetectionSection(_Section):
    """Turning samples and the reference index into evidence; defaults from the papers."""

    k: int = Field(10, gt=0, description="Reference neighbours kept per sample.")
    join_batch: int = Field(4096, ge=1, description="Queries per faiss call (>= 256 reaches GEMM speed).")
    join_workers: int | Literal["auto"] = Field("auto", description="Index shard actors; auto: one per shard, at most the CPUs.")
    tile_grid: int = Field(4, gt=0, description="Carlini's tiled L2: tiles per side.")
    clique_delta: float = Field(0.15, gt=0, description="Tiled L2 under which two samples are the same.")
    clique_min: int | Literal["auto"] = Field(
        "auto", description="Clique size that flags a prompt; auto: 10 per 500 samples (Carlini), at least 3."
    )
    split_chunks: int = Field(16, gt=0, description="Somepalli's split-product chunks.")
    verify_top: int = Field(3, gt=0, description="Neighbours per sample verified on pixels.")
    verify_size: int = Field(256, gt=0, description="Largest side at which pixel distances are computed.")
    match_l2: float = Field(0.15, gt=0, description="Tiled L2 of a verified copy (Carlini's extraction).")
    template_similarity: float = Field(
        0.5, gt=0, le=1, description="Copy similarity above which a non-matching pair is a layout copy (Somepalli)."
    )
    flag_score: float = Field(0.5, ge=0, le=1, description="Memorization score at which a prompt is flagged.")

    @field_validator("join_workers", "clique_min")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return value


class AuditConfig(_Section):
    """A complete audit run."""

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    prompts: PromptsSection = PromptsSection()
    generation: GenerationSection = GenerationSection()
    compute: ComputeSection = ComputeSection()
    embedding: EmbeddingSection = EmbeddingSection()
    reference: ReferenceSection = ReferenceSection()
    detection: DetectionSection = DetectionSection()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def result_identity(
        self, checkpoint_sha256: str, prompts_sha256: str, device_type: str, dtype: str
    ) -> dict[str, Any]:
        """Everything that determines a run's samples: seed, sampling settings, checkpoint
        content, the planned prompts and the numerics (device type and dtype after resolving
        ``auto``). Paths, compute settings and batch size are left out, so moving files or
        resizing the cluster keeps the same run."""
        return {
            "seed": self.run.seed,
            "generation": self.generation.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json", include={"scheduler", "safety_checker"}),
            "checkpoint_sha256": checkpoint_sha256,
            "prompts_sha256": prompts_sha256,
            "device_type": device_type,
            "dtype": dtype,
        }


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 of a run identity (see :meth:`AuditConfig.result_identity`)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


_PATH_KEYS = (("model", "path"), ("prompts", "source"), ("run", "root"), ("reference", "path"),
              ("embedding", "model"), ("embedding", "pretrained"))
# Values that may be names rather than paths: resolved only when the file exists.
_MAYBE_NAME = {("model", "path"), ("embedding", "model"), ("embedding", "pretrained")}


def _format_error(error: Mapping[str, Any], model: type[BaseModel], origin: str) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(model, loc[:-1]))
        return f"{origin}: unknown key '{key}'; allowed keys here: {allowed}"
    if kind == "model_type":
        allowed = ", ".join(_fields_at(model, loc))
        return f"{origin}: '{key}' must be a mapping with keys: {allowed}"
    got = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        message = f"{got!r} is not allowed; allowed values: {error['ctx']['expected']}"
    elif kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        message = f"{message} (got {got!r})"
    return f"{origin}: {key}: {message}"


def _fields_at(model: type[BaseModel], loc: Sequence[str]) -> list[str]:
    current: type[BaseModel] = model
    for part in loc:
        annotation = current.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. generation.steps=25")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = parsed


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in _PATH_KEYS:
        node = raw.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(key), str):
            continue
        value = node[key]
        if value.startswith("builtin:") or "://" in value or value.startswith("local-dir:"):
            continue
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            resolved = (base / candidate).resolve()
            # A relative model path that is not on disk may be a hub id or a model name; keep it.
            if (section, key) in _MAYBE_NAME and not resolved.exists():
                continue
            node[key] = str(resolved)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so a setting the user wrote would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one of them", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base_dir: Path | None = None,
) -> AuditConfig:
    """Load and validate a config file (the built-in default when ``path`` is None).

    ``overrides`` are ``key.path=value`` strings applied before validation. Relative paths are
    resolved against the config file's folder; for the built-in default, against ``base_dir``
    (the current directory by default).
    """
    if path is None:
        origin, text, base = "built-in default config", DEFAULT_CONFIG.read_text(), base_dir
    else:
        file = Path(path)
        origin = str(file)
        if not file.is_file():
            raise ConfigError(f"{file}: config file not found (pass the path of a YAML file)")
        text, base = file.read_text(encoding="utf-8"), file.resolve().parent
    base = base or Path.cwd()
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{origin}{where}: malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin}: the top level must be a mapping of sections "
            f"({', '.join(AuditConfig.model_fields)}), got {type(raw).__name__}"
        )
    for assignment in overrides:
        _apply_override(raw, assignment)
    _resolve_paths(raw, base)
    try:
        return AuditConfig.model_validate(raw)
    except ValidationError as exc:
        messages = [_format_error(err, AuditConfig, origin) for err in exc.errors()]
        raise ConfigError("; ".join(messages)) from None


def dump_config(cfg: AuditConfig) -> str:
    """The config as YAML, every default spelled out."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
