"""The run configuration: one typed, frozen object loaded from YAML.

Unknown keys are rejected and every error names the key path and the allowed values, in one line.
Relative paths in a config file are resolved against the directory of that file, so a config and
the files it names can be moved together. The whole config is frozen into each run's ``run.json``
(see docs/schema.md).

The section models (``ModelSection``, ``GenerationSection`` ...) are defined in
:mod:`audit.config_sections` and re-exported here, so ``from audit.config import X`` works for
every config name; this module holds the root :class:`AuditConfig`, YAML loading with ``--set``
overrides and path resolution, and the run :func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from audit.config_sections import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ComputeSection,
    DetectionSection,
    EmbeddingSection,
    GenerationSection,
    LoraAdapter,
    ModelSection,
    PromptsSection,
    ReferenceSection,
    RunSection,
    ScreenSection,
    Section,
)
from audit.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "audit.yaml"


class AuditConfig(Section):
    """A complete audit run."""

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    prompts: PromptsSection = PromptsSection()
    generation: GenerationSection = GenerationSection()
    compute: ComputeSection = ComputeSection()
    embedding: EmbeddingSection = EmbeddingSection()
    reference: ReferenceSection = ReferenceSection()
    detection: DetectionSection = DetectionSection()
    screen: ScreenSection | None = None  # present: screen every prompt, escalate the suspects

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-compatible data (what ``run.json`` records)."""
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
            "generation": self.generation.model_dump(mode="json", exclude=self._unset_generation_keys()),
            "model": self.model.model_dump(mode="json", include={"scheduler", "safety_checker"}),
            "checkpoint_sha256": checkpoint_sha256,
            "prompts_sha256": prompts_sha256,
            "device_type": device_type,
            "dtype": dtype,
            # Present only with a screen, so runs without one keep their identity.
            **({"screen": self.screen.model_dump(mode="json")} if self.screen is not None else {}),
        }


    def _unset_generation_keys(self) -> set[str]:
        """Settings that joined the identity after runs existed, left out while off so those
        runs keep their ids: the extra unconditional call (adds measurements, not pixels) and
        adaptive rounds."""
        gen, out = self.generation, set()
        if not gen.noise_magnitude_extra_uncond:
            out.add("noise_magnitude_extra_uncond")
        if gen.max_samples_per_prompt is None:
            out |= {"max_samples_per_prompt", "clean_after_samples"}
        return out


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 of a run identity (see :meth:`AuditConfig.result_identity`)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


_PATH_KEYS = (("model", "path"), ("prompts", "source"), ("run", "root"), ("reference", "path"),
              ("embedding", "model"), ("embedding", "pretrained"))
# Values that may be names rather than paths: resolved only when the file exists.
_MAYBE_NAME = {("model", "path"), ("embedding", "model"), ("embedding", "pretrained")}


def _format_error(error: Mapping[str, Any], model: type[BaseModel], origin: str) -> str:
    """One pydantic error as one line naming the file, the key path and what is allowed there,
    so a user can fix the config without reading the section models."""
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
    """The keys allowed in the section at ``loc`` (empty when ``loc`` is not a section)."""
    current: type[BaseModel] = model
    for part in loc:
        annotation = current.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set key.path=value`` to the raw mapping, the value parsed as YAML (so
    ``25`` is an int and ``null`` is None) and validated later with the rest of the file."""
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
    """Make the config's relative file paths absolute against ``base``, leaving builtin names,
    URIs and values that may be hub ids or model names (when no such file exists) alone."""
    nodes = [(raw.get(section), key, (section, key) in _MAYBE_NAME) for section, key in _PATH_KEYS]
    model = raw.get("model")
    adapters = model.get("lora") if isinstance(model, dict) else None
    nodes += [(adapter, "path", False) for adapter in adapters or () if isinstance(adapters, list)]
    for node, key, maybe_name in nodes:
        if not isinstance(node, dict) or not isinstance(node.get(key), str):
            continue
        value = node[key]
        if value.startswith("builtin:") or "://" in value or value.startswith("local-dir:"):
            continue
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            resolved = (base / candidate).resolve()
            # A relative model path that is not on disk may be a hub id or a model name; keep it.
            if maybe_name and not resolved.exists():
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
    if "screen" in raw and raw["screen"] is None:
        raw["screen"] = {}  # a bare `screen:` turns screening on with its defaults
    _resolve_paths(raw, base)
    try:
        return AuditConfig.model_validate(raw)
    except ValidationError as exc:
        messages = [_format_error(err, AuditConfig, origin) for err in exc.errors()]
        raise ConfigError("; ".join(messages)) from None


def dump_config(cfg: AuditConfig) -> str:
    """The config as YAML, every default spelled out; no ``screen:`` key when screening is off
    (a bare or null ``screen:`` turns it on)."""
    data = cfg.to_dict()
    if data.get("screen") is None:
        data.pop("screen", None)
    return yaml.safe_dump(data, sort_keys=False)


__all__ = [
    "DEFAULT_CONFIG",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AuditConfig",
    "ComputeSection",
    "DetectionSection",
    "EmbeddingSection",
    "GenerationSection",
    "LoraAdapter",
    "ModelSection",
    "PromptsSection",
    "ReferenceSection",
    "RunSection",
    "ScreenSection",
    "Section",
    "dump_config",
    "fingerprint",
    "load_config",
]
