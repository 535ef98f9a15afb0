"""The generation stage: sample rows in, PNG rows out (Ray-free; docs/architecture.md, "Data flow").

``GenerateStage(cfg)`` loads the pipeline once; calling it on a batch of sample rows generates one
image per row from that row's own seed (one ``torch.Generator`` per sample, on the CPU, so the
initial noise is the same on every device and in every batch), records Wen et al.'s noise
magnitude, and returns lossless PNG bytes plus a thumbnail. A failing batch becomes rows with
``status = "error"`` and the reason; nothing is dropped.

The work is split in two phases so the caller can overlap them: ``generate`` (accelerator) and
``encode`` (CPU: PNG). ``__call__`` runs both, for use as a plain callable or in ``map_batches``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from audit.config import AuditConfig
from audit.generate.png import encode_png, encode_thumbnail, to_uint8
from audit.generate.families import FLOW, family_of
from audit.generate.loading import load_pipeline, resolve_model, resolve_numerics
from audit.generate.noise import EpsilonConversion, NoiseMagnitudeRecorder
from audit.schema import STATUS_ERROR, STATUS_OK

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
INPUT_COLUMNS = ("sample_id", "prompt_id", "prompt", "sample_idx", "seed")


@dataclass
class RawBatch:
    """Output of the accelerator phase for one batch."""

    pixels: np.ndarray | None  # NHWC uint8
    finite: np.ndarray  # per sample: every pixel finite
    noise_magnitude: np.ndarray  # float32 per sample
    error: str | None  # why the whole batch failed


class GenerateStage:
    """Generate one image per sample row with a diffusers text-to-image pipeline."""

    def __init__(self, cfg: AuditConfig, device: str | None = None, dtype: str | None = None) -> None:
        self.cfg = cfg
        if device is None or dtype is None:
            device, dtype = resolve_numerics(cfg.model, torch.cuda.is_available())
        self.device, self.dtype = device, dtype
        folder = resolve_model(cfg.model).folder
        self.pipe = load_pipeline(cfg.model, folder, self.device, self.dtype)
        self.family = family_of(type(self.pipe).__name__, str(folder))
        self.denoiser = getattr(self.pipe, self.family.denoiser)
        prediction = FLOW if self.family.flow else str(self.pipe.scheduler.config.get("prediction_type", "epsilon"))
        self.conversion = EpsilonConversion.for_pipeline(self.pipe.scheduler, prediction, self.family.timestep_scale)
        self._uncond: dict[str, torch.Tensor] | None = None
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        log.info("generation stage ready: %s on %s (%s)", type(self.pipe).__name__, self.device, self.dtype)

    def generate(self, batch: Batch) -> RawBatch:
        """Run the pipeline on one batch (the accelerator phase)."""
        gen = self.cfg.generation
        n = len(batch["seed"])
        arguments = self.call_arguments(batch, "pt")
        size = len(arguments["generator"])
        extra = partial(self._empty_prompt_inputs, size) if gen.noise_magnitude_extra_uncond else None
        recorder = NoiseMagnitudeRecorder(self.denoiser, size, gen.noise_magnitude_steps, self.conversion, extra)
        try:
            with torch.inference_mode(), recorder:
                output = self.pipe(**arguments)
            pixels, finite = to_uint8(output.images[:n])
            return RawBatch(pixels, finite, recorder.values()[:n], None)
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes error rows, never a lost shard
            log.exception("generation failed for a batch of %d samples", n)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            return RawBatch(None, np.zeros(n, bool), np.full(n, np.nan, np.float32), reason)

    def call_arguments(self, batch: Batch, output_type: str) -> dict[str, Any]:
        """The pipeline ``__call__`` arguments for one batch of rows (``prompt`` and ``seed``).

        Every forward has exactly compute.batch_size rows (a short batch is padded with copies of
        its last row, whose outputs are dropped): kernels are chosen by shape, so a fixed shape
        makes a sample's pixels, and its measurements, independent of where it falls in a shard."""
        gen = self.cfg.generation
        pad = max(self.cfg.compute.batch_size - len(batch["seed"]), 0)
        seeds = [int(s) for s in batch["seed"]] + [int(batch["seed"][-1])] * pad
        prompts = [str(p) for p in batch["prompt"]] + [str(batch["prompt"][-1])] * pad
        kwargs: dict[str, Any] = dict(self.family.call_kwargs)
        if self.family.negative_prompt and gen.negative_prompt:  # else the pipeline's own default (SDXL: zeros)
            kwargs["negative_prompt"] = [gen.negative_prompt] * len(seeds)
        return {"prompt": prompts, "num_inference_steps": gen.steps, "guidance_scale": gen.guidance_scale,
                "height": gen.height, "width": gen.width,
                "generator": [torch.Generator(device="cpu").manual_seed(s) for s in seeds],
                "output_type": output_type, **kwargs}

    def _empty_prompt_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The denoiser's text inputs for the empty prompt (a guidance-distilled model's extra
        unconditional call; docs/model_families.md), encoded once per worker."""
        if self._uncond is None or len(self._uncond["encoder_hidden_states"]) != batch_size:
            embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=[""] * batch_size, prompt_2=None,
                                                               device=self.pipe.device)
            self._uncond = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
        return self._uncond

    def encode(self, batch: Batch, raw: RawBatch) -> Batch:
        """PNG-encode one generated batch (the CPU phase) into output rows."""
        gen = self.cfg.generation
        n = len(batch["seed"])
        images: list[bytes | None] = [None] * n
        thumbs: list[bytes | None] = [None] * n
        status = np.full(n, STATUS_OK, dtype=object)
        errors: list[str | None] = [None] * n
        height = width = None
        if raw.pixels is None:
            status[:] = STATUS_ERROR
            errors = [raw.error] * n
        else:
            height, width = raw.pixels.shape[1:3]
            good = [i for i in range(n) if raw.finite[i]]
            encoded = self._pool.map(partial(encode_png, compress_level=gen.png_compress_level),
                                     (raw.pixels[i] for i in good))
            small = self._pool.map(partial(encode_thumbnail, size=gen.thumbnail_size),
                                   (raw.pixels[i] for i in good))
            for i, png, thumb in zip(good, encoded, small):
                images[i], thumbs[i] = png, thumb
            for i in set(range(n)) - set(good):
                status[i] = STATUS_ERROR
                errors[i] = (
                    f"non-finite pixels (NaN/Inf): the model overflowed in {self.dtype}; "
                    "try model.dtype bfloat16 or float32"
                )
        return {
            "sample_id": batch["sample_id"],
            "prompt_id": batch["prompt_id"],
            "sample_idx": batch["sample_idx"],
            "seed": batch["seed"],
            "image_png": np.array(images, dtype=object),
            "thumb_png": np.array(thumbs, dtype=object),
            "width": np.array([width if png is not None else None for png in images], dtype=object),
            "height": np.array([height if png is not None else None for png in images], dtype=object),
            "noise_magnitude": raw.noise_magnitude,
            "status": status,
            "error": np.array(errors, dtype=object),
        }

    def __call__(self, batch: Batch) -> Batch:
        return self.encode(batch, self.generate(batch))
