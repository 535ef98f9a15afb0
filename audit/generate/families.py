"""The pipeline families memaudit audits, and what differs between them (docs/model_families.md).

A family is a diffusers pipeline class. What the generation stage needs to know about one:
which attribute holds the denoiser, whether classifier-free guidance batches ``[uncond, cond]``
into one denoiser call (every family but Flux, which is guidance-distilled), whether the denoiser
predicts a flow-matching velocity (SD3, Flux) or ε / v / x₀ on a variance-preserving schedule
(the scheduler's ``prediction_type``), how the denoiser's ``timestep`` argument relates to the
scheduler's timesteps (Flux passes ``t / 1000``), the pipeline's own default latent size when its
config has none (Flux), and extra ``__call__`` arguments memaudit sets. Everything here is read
from configs: no weights are loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.errors import InputError

FLOW = "flow"  # prediction type of flow-matching models: the velocity ε − x₀


@dataclass(frozen=True)
class Family:
    """One supported pipeline class."""

    name: str  # short name recorded in run.json: sd, sdxl, sd3, flux, pixart
    pipeline_class: str
    label: str  # what users call it, for messages and the README
    denoiser: str  # pipeline attribute: "unet" or "transformer"
    cfg: bool  # CFG runs the denoiser on [x_t, x_t] with [uncond, cond] in one call
    flow: bool  # the denoiser predicts a flow-matching velocity
    timestep_scale: float = 1.0  # the denoiser's timestep argument x this = the scheduler's timestep
    size_factor: int = 1  # height/width must be multiples of the VAE factor x patch size x this (packing)
    pipeline_multiple: int = 1  # ... and of this, which the pipeline's own input check demands
    default_latent: int | None = None  # latent side the pipeline uses when its config has no sample_size
    negative_prompt: bool = True  # __call__ takes a negative prompt (when empty, the pipeline's own default)
    call_kwargs: tuple[tuple[str, Any], ...] = ()  # extra __call__ arguments memaudit always sets
    lora: bool = True  # the pipeline has diffusers' load_lora_weights


FAMILIES: dict[str, Family] = {f.pipeline_class: f for f in (
    Family("sd", "StableDiffusionPipeline", "Stable Diffusion 1.x / 2.x", "unet", cfg=True, flow=False,
           pipeline_multiple=8),
    Family("sdxl", "StableDiffusionXLPipeline", "SDXL", "unet", cfg=True, flow=False, pipeline_multiple=8),
    Family("sd3", "StableDiffusion3Pipeline", "Stable Diffusion 3", "transformer", cfg=True, flow=True),
    # Flux-dev/schnell are guidance-distilled: guidance_scale feeds a guidance embedding, one
    # denoiser call per step, no unconditional pass; the transformer is called with t / 1000 and
    # sees 2x2-packed latents; its pipeline defaults to 128 latent pixels (1024 px at VAE factor 8).
    Family("flux", "FluxPipeline", "Flux", "transformer", cfg=False, flow=True, timestep_scale=1000.0,
           size_factor=2, default_latent=128, negative_prompt=False),
    # Resolution binning would silently generate at the nearest aspect-ratio bin and resize;
    # memaudit generates at the size it records. Caption cleaning depends on whether optional
    # packages (bs4, ftfy) are installed, so the same prompt could reach the encoder differently
    # on two workers: it is off.
    Family("pixart", "PixArtAlphaPipeline", "PixArt-α", "transformer", cfg=True, flow=False, pipeline_multiple=8,
           call_kwargs=(("use_resolution_binning", False), ("clean_caption", False)), lora=False),
)}


def supported() -> str:
    """One line listing the supported pipeline classes."""
    return ", ".join(f"{f.pipeline_class} ({f.label})" for f in FAMILIES.values())


def family_of(class_name: str, where: str) -> Family:
    """The family of a pipeline class, or an :class:`InputError` listing the supported ones."""
    if class_name not in FAMILIES:
        raise InputError(f"model.path: {where} is a {class_name or 'pipeline without _class_name'}, which memaudit "
                         f"does not support; supported pipelines: {supported()}")
    return FAMILIES[class_name]


def prediction_type(folder: Path, family: Family) -> str:
    """What the denoiser outputs: ``flow`` for flow-matching families, else the scheduler's
    ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``)."""
    if family.flow:
        return FLOW
    config = folder / "scheduler" / "scheduler_config.json"
    value = json.loads(config.read_text()).get("prediction_type", "epsilon") if config.is_file() else "epsilon"
    if value not in ("epsilon", "v_prediction", "sample"):
        raise InputError(f"model.path: {folder} has prediction_type {value!r} in scheduler_config.json; "
                         "memaudit converts epsilon, v_prediction and sample predictions to noise")
    return str(value)


def noise_magnitude_plan(family: Family, guidance_scale: float, extra_uncond: bool) -> str | None:
    """``None`` when the noise magnitude is measured, else why every value is NaN."""
    if family.cfg:
        if guidance_scale <= 1:
            return "classifier-free guidance is off (generation.guidance_scale <= 1): no unconditional pass"
        return None
    if extra_uncond:
        return None
    return (f"{family.label} is guidance-distilled and has no unconditional pass; set "
            "generation.noise_magnitude_extra_uncond: true to add one denoiser call at each of the first K steps")


def check_settings(family: Family, where: str, negative_prompt: str, extra_uncond: bool, adapters: int) -> None:
    """Refuse settings the family cannot honour."""
    if adapters and not family.lora:
        raise InputError(f"model.lora: {where} is a {family.pipeline_class}, which has no LoRA loader in diffusers; "
                         "merge the adapter into the weights, or audit a family that loads adapters")
    if extra_uncond and family.cfg:
        raise InputError(f"generation.noise_magnitude_extra_uncond: {where} is a {family.pipeline_class}, whose "
                         "classifier-free guidance already makes the unconditional pass; remove the setting")
    if negative_prompt and not family.negative_prompt:
        raise InputError(f"generation.negative_prompt: {where} is a {family.pipeline_class} ({family.label}), "
                         "which runs no unconditional pass for a negative prompt to steer; remove it")
