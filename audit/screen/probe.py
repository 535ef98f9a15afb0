"""Reading the screen's signals out of one pipeline call (docs/screening.md, "How a batch is
screened").

The pipeline runs its own ``__call__`` (text encoding, initial noise from each row's generator,
its scheduler's timesteps, family-specific denoiser arguments), and a forward hook on the denoiser
reads the first informative call's ``[uncond, cond]`` predictions, makes one more call with the
same arguments on the first call's pure-noise input at a low-noise timestep, and then stops the
pipeline by raising :class:`ScreenDone`: no further step, no VAE decode. With ``steps`` > 1 the
pipeline goes on for that many sampler steps, the scheduler's ``step`` wrapped to read each
update's norm, and stops after the last one.
"""

from __future__ import annotations

from functools import partial
from types import TracebackType
from typing import Any

import torch

from audit.generate.noise import EpsilonConversion, denoiser_inputs, prediction_of
from audit.screen import signals

LOW_NOISE_FROM_END = 3  # Asthana & Belagiannis read the alignment at the schedule's third-to-last timestep


class ScreenDone(Exception):
    """Raised by the hook once the batch's signals are read: the pipeline call ends there."""


def _with_timestep(args: tuple[Any, ...], kwargs: dict[str, Any], value: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The denoiser arguments with the timestep replaced by ``value`` (same shape and dtype)."""
    if "timestep" in kwargs:
        return args, {**kwargs, "timestep": torch.full_like(torch.as_tensor(kwargs["timestep"]), value)}
    return (args[0], torch.full_like(torch.as_tensor(args[1]), value), *args[2:]), kwargs


class ScreenProbe:
    """Context manager: hooks ``denoiser`` (and with ``steps`` > 1 the scheduler's ``step``) for one
    pipeline call of ``batch_size`` rows and keeps per-row ``noise_magnitude``, ``alignment`` and
    ``latent_update`` (float64 tensors) once read."""

    def __init__(self, denoiser: torch.nn.Module, scheduler: Any, batch_size: int,
                 conversion: EpsilonConversion, timestep_scale: float, steps: int = 1) -> None:
        self.denoiser, self.scheduler, self.batch_size = denoiser, scheduler, batch_size
        self.conversion, self.timestep_scale, self.steps = conversion, timestep_scale, steps
        self.noise_magnitude: torch.Tensor | None = None
        self.alignment: torch.Tensor | None = None
        self.updates: list[torch.Tensor] = []
        self.denoiser_calls = 0
        self._first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._handle: Any = None
        self._inside = False

    def _hook(self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._inside:
            return
        self.denoiser_calls += 1
        if self.alignment is not None:
            return  # read already; the pipeline only goes on for the latent updates (screen.steps > 1)
        if self._first is None:
            self._first = (args, kwargs)  # the initial noise x_T (scaled for the denoiser)
        sample, timestep = denoiser_inputs(args, kwargs)
        if self.conversion.weight(timestep) == 0.0:
            return  # a flow model's sigma = 1: no text signal at this call, read the next one
        pred = prediction_of(output)
        if pred.shape[0] != 2 * self.batch_size:
            raise RuntimeError("the denoiser was called without an unconditional pass; the screen needs "
                               "classifier-free guidance (generation.guidance_scale > 1)")
        uncond, cond = pred.chunk(2)
        x_uncond, x_cond = sample.chunk(2)
        self.noise_magnitude = signals.noise_magnitude(self.conversion(uncond, x_uncond, timestep),
                                                       self.conversion(cond, x_cond, timestep))
        first_args, first_kwargs = self._first
        schedule = self.scheduler.timesteps
        low = float(schedule[-min(LOW_NOISE_FROM_END, len(schedule))]) / self.timestep_scale
        low_args, low_kwargs = _with_timestep(first_args, first_kwargs, low)
        self._inside = True
        try:
            low_pred = prediction_of(self.denoiser(*low_args, **low_kwargs))
        finally:
            self._inside = False
        self.denoiser_calls += 1
        pure, _ = denoiser_inputs(low_args, low_kwargs)
        low_uncond, low_cond = low_pred.chunk(2)
        x_low_uncond, x_low_cond = pure.chunk(2)
        self.alignment = signals.alignment(self.conversion(low_uncond, x_low_uncond, low),
                                           self.conversion(low_cond, x_low_cond, low))
        if self.steps <= len(self.updates) or self.steps == 1:
            raise ScreenDone

    @property
    def latent_update(self) -> torch.Tensor | None:
        """Per-row mean update norm over the first ``steps`` sampler steps (None with 1 step)."""
        if self.steps == 1 or len(self.updates) < self.steps:
            return None
        return torch.stack(self.updates[: self.steps]).mean(dim=0)

    def _step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        sample = kwargs.get("sample", args[2] if len(args) > 2 else None)
        out = original(*args, **kwargs)
        after = out[0] if isinstance(out, tuple) else out.prev_sample
        if sample is not None and len(self.updates) < self.steps:
            self.updates.append(signals.update_norm(sample, after))
        if len(self.updates) >= self.steps and self.alignment is not None:
            raise ScreenDone
        return out

    def __enter__(self) -> ScreenProbe:
        self._handle = self.denoiser.register_forward_hook(self._hook, with_kwargs=True)
        if self.steps > 1:  # an instance attribute shadows the class's step for this call only
            self.scheduler.step = partial(self._step, type(self.scheduler).step.__get__(self.scheduler))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.scheduler.__dict__.pop("step", None)
