"""Finding, checking and loading a diffusers text-to-image checkpoint.

A checkpoint is a diffusers pipeline folder (``model_index.json`` plus one folder per
component), a Hugging Face Hub id, or ``builtin:<name>``. Only safetensors weights load unless the
config opts in to pickle-based ones, because unpickling a checkpoint can run arbitrary code.
Everything that can be checked without loading weights is checked here, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.config import GenerationSection, ModelSection
from audit.errors import InputError
from audit.generate.adapters import ResolvedAdapter, apply_adapters, check_adapter_fits, resolve_adapters
from audit.generate.families import Family, check_settings, family_of, noise_magnitude_plan, prediction_type
from audit.location import Location
from audit.weight_files import PICKLE_SUFFIXES, check_complete
from audit.files import folder_safe

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint located on this machine."""

    ref: str  # as configured: folder, object-store URI, hub id or builtin:<name>
    folder: Path  # the diffusers folder on this machine
    kind: str  # "local", "remote", "hub" or "builtin"

    @property
    def default_name(self) -> str:
        if self.kind == "hub":
            return self.ref.replace("/", "--")
        if self.kind == "builtin":
            return self.ref.replace(":", "-")
        return folder_safe(self.folder.name) or "model"


@dataclass(frozen=True)
class PipelineInfo:
    """What the driver needs to know about a pipeline without loading its weights."""

    class_name: str
    components: tuple[str, ...]
    scheduler_class: str
    compatible_schedulers: tuple[str, ...]
    vae_scale_factor: int | None
    default_size: int | None
    family: Family
    prediction: str  # what the denoiser outputs: epsilon, v_prediction, sample or flow
    size_multiple: int  # height and width must be multiples of it
    adapters: tuple[ResolvedAdapter, ...] = ()

    def record(self, generation: GenerationSection) -> dict[str, Any]:
        """run.json's ``family``: what was audited and how its noise magnitude is defined."""
        reason = noise_magnitude_plan(self.family, generation.guidance_scale, generation.noise_magnitude_extra_uncond)
        return {
            "name": self.family.name,
            "pipeline_class": self.class_name,
            "prediction_type": self.prediction,
            "cfg": self.family.cfg and generation.guidance_scale > 1,
            "noise_magnitude": "epsilon difference (docs/model_families.md)" if reason is None else None,
            "noise_magnitude_nan_reason": reason,
            "extra_uncond_calls_per_batch": (generation.noise_magnitude_steps
                                             if generation.noise_magnitude_extra_uncond else 0),
            "adapters": [a.record() for a in self.adapters],
        }


def resolve_model(section: ModelSection) -> ResolvedModel:
    """Locate the configured checkpoint, building a built-in one or downloading a hub one."""
    ref = section.path
    if ref.startswith("builtin:"):
        from audit.testbed.checkpoints import builtin_checkpoint

        return ResolvedModel(ref, builtin_checkpoint(ref.removeprefix("builtin:")), "builtin")
    where = Location.of(ref)
    if where.is_remote:  # every node mirrors it into its own cache (only missing files are fetched)
        folder = where.materialize("model.path")
        if not (folder / "model_index.json").is_file():
            raise InputError(f"model.path: {ref} has no model_index.json, so it is not a diffusers pipeline "
                             "folder (upload one saved with pipeline.save_pretrained)")
        return ResolvedModel(ref, folder, "remote")
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            raise InputError(
                f"model.path: {path} is a file; give a diffusers pipeline folder "
                "(one holding model_index.json)"
            )
        if not (path / "model_index.json").is_file():
            raise InputError(
                f"model.path: {path} has no model_index.json, so it is not a diffusers pipeline "
                "folder (save one with pipeline.save_pretrained)"
            )
        return ResolvedModel(ref, path.resolve(), "local")
    if not _HUB_ID.match(ref):
        raise InputError(f"model.path: directory {path} does not exist")
    return ResolvedModel(ref, _download(ref, section), "hub")


def _download(repo_id: str, section: ModelSection) -> Path:
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(
            repo_id,
            revision=section.revision,
            use_safetensors=None if section.allow_pickle else True,
        )
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types; all mean "unreachable"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"model.path: {repo_id!r} is not a local directory and could not be fetched as a "
            f"Hugging Face Hub id ({first_line})"
        ) from None
    return Path(folder)


def component_folders(folder: Path) -> dict[str, Path]:
    """Component name -> folder, for the components model_index.json lists."""
    index = json.loads((folder / "model_index.json").read_text())
    return {
        name: folder / name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
        and (folder / name).is_dir()
    }


def check_weight_format(folder: Path, allow_pickle: bool) -> None:
    """Refuse components whose weights exist only in a pickle-based format."""
    if allow_pickle:
        return
    for name, component in component_folders(folder).items():
        files = [f for f in component.iterdir() if f.is_file()]
        pickled = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
        has_safetensors = any(f.suffix == ".safetensors" for f in files)
        if pickled and not has_safetensors:
            raise InputError(
                f"model.path: component {name!r} of {folder} has only pickle-based weights "
                f"({', '.join(pickled)}), which can run code when loaded; convert them to "
                "safetensors, or set model.allow_pickle: true if you trust the source"
            )


def checkpoint_digest(folder: Path) -> dict[str, Any]:
    """Content hash of a pipeline folder: every file's relative path and bytes, in path order."""
    digest = hashlib.sha256()
    n_files = n_bytes = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(8 * 2**20), b""):
                file_digest.update(block)
                n_bytes += len(block)
        digest.update(f"{relative}\0{file_digest.hexdigest()}\n".encode())
        n_files += 1
    return {"sha256": digest.hexdigest(), "files": n_files, "bytes": n_bytes}


def inspect_pipeline(folder: Path) -> PipelineInfo:
    """Read a pipeline folder's configs (no weights); refuse a pipeline class memaudit does not support."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    family = family_of(str(index.get("_class_name", "")), str(folder))
    components = tuple(component_folders(folder))
    scheduler_class = (index.get("scheduler") or [None, ""])[1] or ""
    compatible: tuple[str, ...] = ()
    scheduler_cls = getattr(diffusers, scheduler_class, None)
    if scheduler_cls is not None:
        names = {scheduler_class, *getattr(scheduler_cls, "_compatibles", [])}
        compatible = tuple(sorted(n for n in names if hasattr(diffusers, n)))
    vae_scale = default_size = None
    vae_config = folder / "vae" / "config.json"
    if vae_config.is_file():
        vae_scale = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0])) - 1)
    denoiser_config = folder / family.denoiser / "config.json"
    config = json.loads(denoiser_config.read_text()) if denoiser_config.is_file() else {}
    sample_size = config.get("sample_size", family.default_latent)
    if isinstance(sample_size, int) and vae_scale:
        default_size = sample_size * vae_scale
    patch = config.get("patch_size") if family.denoiser == "transformer" else None
    return PipelineInfo(
        class_name=family.pipeline_class,
        components=components,
        scheduler_class=scheduler_class,
        compatible_schedulers=compatible,
        vae_scale_factor=vae_scale,
        default_size=default_size,
        family=family,
        prediction=prediction_type(folder, family),
        size_multiple=math.lcm((vae_scale or 8) * (patch if isinstance(patch, int) else 1) * family.size_factor,
                               family.pipeline_multiple),
    )


def preflight(section: ModelSection, generation: GenerationSection) -> tuple[ResolvedModel, PipelineInfo]:
    """Every check that needs no weights: location, weight format, family, adapters, scheduler,
    resolution."""
    resolved = resolve_model(section)
    check_weight_format(resolved.folder, section.allow_pickle)
    check_complete(resolved.folder, section.allow_pickle)
    info = inspect_pipeline(resolved.folder)
    check_settings(info.family, resolved.ref, generation.negative_prompt, generation.noise_magnitude_extra_uncond,
                   len(section.lora))
    adapters = resolve_adapters(section)
    for i, adapter in enumerate(adapters):
        if not check_adapter_fits(adapter, resolved.folder, f"model.lora[{i}].path"):
            log.warning("model.lora[%d]: %s is not in the diffusers/peft layout; its fit is checked only when the "
                        "workers load it", i, adapter.file)
    info = dataclasses.replace(info, adapters=tuple(adapters))
    if section.scheduler is not None and section.scheduler not in info.compatible_schedulers:
        raise InputError(
            f"model.scheduler: {section.scheduler!r} is not a scheduler {info.class_name} can use; "
            f"allowed values: {', '.join(info.compatible_schedulers) or 'none found'}"
        )
    multiple = info.size_multiple
    for key in ("height", "width"):
        value = getattr(generation, key)
        if value is not None and value % multiple:
            raise InputError(
                f"generation.{key}: {value} is not a multiple of {multiple} "
                f"(the VAE's downsampling factor x the denoiser's patch size of {resolved.ref})"
            )
    return resolved, info


def load_pipeline(section: ModelSection, folder: Path, device: str, dtype: str) -> Any:
    """``DiffusionPipeline.from_pretrained`` with the configured dtype, device and scheduler."""
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "use_safetensors": None if section.allow_pickle else True,
    }
    if not section.safety_checker and "safety_checker" in component_folders(folder):
        kwargs["safety_checker"] = None
        kwargs["requires_safety_checker"] = False
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **kwargs)
    if section.scheduler is not None:
        pipe.scheduler = getattr(diffusers, section.scheduler).from_config(pipe.scheduler.config)
    apply_adapters(pipe, resolve_adapters(section))
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    attribute = family_of(type(pipe).__name__, str(folder)).denoiser
    if section.channels_last:
        getattr(pipe, attribute).to(memory_format=torch.channels_last)
    if section.compile:
        setattr(pipe, attribute, torch.compile(getattr(pipe, attribute)))
    return pipe


def resolve_numerics(section: ModelSection, has_cuda: bool) -> tuple[str, str]:
    """Device and dtype after resolving ``auto``: bfloat16 on CUDA, float32 elsewhere."""
    device = section.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    elif device.startswith("cuda") and not has_cuda:
        raise InputError(
            f"model.device: {device!r} but no GPU is available to the workers; "
            "use device: auto or cpu, or join a cluster with GPUs (--address)"
        )
    dtype = section.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype == "float16" and device == "cpu":
        raise InputError("model.dtype: float16 is not supported on CPU; use float32 or bfloat16")
    return device, dtype
