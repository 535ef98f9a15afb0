"""Wen et al. (ICLR 2024): the magnitude of the text-conditional noise prediction, one definition
for every family (docs/model_families.md, "Noise magnitude").

The value is ``||ε(x_t, c) − ε(x_t, ∅)||₂`` per sample, averaged over the first K denoiser calls
that carry information. Denoisers predict different things, so each output is first converted to
the noise prediction ε (:class:`EpsilonConversion`), with x_t the denoiser's own input:

- ε-prediction: ε as is;
- v-prediction (SD 2.x-v): ε = √ᾱ_t · v + √(1−ᾱ_t) · x_t;
- x₀-prediction: ε = (x_t − √ᾱ_t · x₀) / √(1−ᾱ_t);
- flow-matching velocity (SD3, Flux; x_t = (1−σ)·x₀ + σ·ε, v = ε − x₀): ε = x_t + (1−σ) · v.

At σ = 1 (a flow model's first step) x_t is pure noise, so ε = x_t whatever the prompt: such a
call carries no text signal and is not counted; the K counted calls start at the next one.

With classifier-free guidance the denoiser is called on ``[x_t, x_t]`` with ``[uncond, cond]``
embeddings; diffusers splits the output with ``chunk(2)`` in that order, and a forward hook reads
both halves: no extra denoiser call. Guidance-distilled models (Flux) make one conditional call
per step; with ``extra_uncond`` the hook adds one call with the empty prompt's embeddings at each
of the first K counted steps (K more denoiser calls per batch), otherwise the values are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from audit.generate.families import FLOW


def noise_magnitude(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of the text-conditional part of the noise prediction."""
    return (cond.float() - uncond.float()).flatten(1).norm(dim=1)


def alpha_bar_at(alphas_cumprod: np.ndarray, timestep: float) -> float:
    """ᾱ at a (possibly fractional) timestep. Fractional timesteps (Euler schedulers) come from
    interpolating log σ, σ = √((1−ᾱ)/ᾱ), between training timesteps; this inverts that mapping
    and equals ``alphas_cumprod[t]`` at integer t."""
    log_sigma = 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)
    value = float(np.interp(timestep, np.arange(len(alphas_cumprod)), log_sigma))
    return 1.0 / (1.0 + math.exp(2.0 * value))


@dataclass(frozen=True)
class EpsilonConversion:
    """Denoiser output → noise prediction ε, for one pipeline (see the module docstring)."""

    prediction: str  # epsilon, v_prediction, sample or flow
    num_train_timesteps: int
    alphas_cumprod: np.ndarray | None = None  # variance-preserving schedules
    timestep_scale: float = 1.0  # the denoiser's timestep argument x this = the scheduler's timestep

    @classmethod
    def for_pipeline(cls, scheduler: Any, prediction: str, timestep_scale: float) -> EpsilonConversion:
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if prediction != FLOW and prediction != "epsilon" and alphas is None:
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod to convert {prediction} to noise")
        values = None if alphas is None else np.asarray(torch.as_tensor(alphas).double().cpu().numpy())
        return cls(prediction, int(scheduler.config.num_train_timesteps), values, timestep_scale)

    def weight(self, timestep: float) -> float:
        """How strongly ε depends on the prediction at this timestep (0: not at all)."""
        if self.prediction == FLOW:
            return max(0.0, 1.0 - timestep * self.timestep_scale / self.num_train_timesteps)
        return 1.0

    def __call__(self, output: torch.Tensor, sample: torch.Tensor, timestep: float) -> torch.Tensor:
        output, sample = output.double(), sample.double()
        if output.ndim == 4 and output.shape[1] == 2 * sample.shape[1]:
            output = output[:, : sample.shape[1]]  # learned variance (PixArt): the first half is the prediction
        if self.prediction == "epsilon":
            return output
        if self.prediction == FLOW:
            sigma = timestep * self.timestep_scale / self.num_train_timesteps
            return sample + (1.0 - sigma) * output
        assert self.alphas_cumprod is not None
        alpha_bar = alpha_bar_at(self.alphas_cumprod, timestep * self.timestep_scale)
        if self.prediction == "v_prediction":
            return math.sqrt(alpha_bar) * output + math.sqrt(1.0 - alpha_bar) * sample
        return (sample - math.sqrt(alpha_bar) * output) / math.sqrt(1.0 - alpha_bar)  # x0-prediction


def denoiser_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """The noisy input x_t and the timestep of one denoiser call (UNets take them positionally,
    transformers as ``hidden_states=`` and ``timestep=``)."""
    sample = kwargs.get("hidden_states", kwargs.get("sample"))
    if sample is None:
        sample = args[0]
    timestep = kwargs.get("timestep")
    if timestep is None:
        timestep = args[1]
    value = torch.as_tensor(timestep).flatten()
    return sample, float(value[0]) if value.numel() else float(value)


def prediction_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's output (tuple or ``.sample``)."""
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


class NoiseMagnitudeRecorder:
    """Context manager recording the mean noise magnitude over the first ``first_k`` informative
    denoiser calls of one pipeline call of ``batch_size`` samples.

    For first-order schedulers one call is one step; schedulers that evaluate the denoiser twice
    per step (Heun) count each evaluation. Without an unconditional pass the values are NaN, unless
    ``uncond_inputs`` gives the keyword arguments that replace the prompt's embeddings in one extra
    denoiser call per counted step.
    """

    def __init__(self, denoiser: torch.nn.Module, batch_size: int, first_k: int, conversion: EpsilonConversion,
                 uncond_inputs: Callable[[], dict[str, Any]] | None = None) -> None:
        self.denoiser, self.batch_size, self.first_k = denoiser, batch_size, first_k
        self.conversion, self.uncond_inputs = conversion, uncond_inputs
        self.calls = 0
        self.counted = 0
        self.extra_calls = 0
        self.without_cfg = False
        self._sum: torch.Tensor | None = None
        self._handle: Any = None
        self._inside = False

    def _hook(self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._inside:  # our own extra call
            return
        self.calls += 1
        if self.counted >= self.first_k:
            return
        sample, timestep = denoiser_inputs(args, kwargs)
        if self.conversion.weight(timestep) == 0.0:
            return
        pred = prediction_of(output)
        if pred.shape[0] == 2 * self.batch_size:
            uncond, cond = pred.chunk(2)
            x_uncond, x_cond = sample.chunk(2)
        elif self.uncond_inputs is not None:
            cond, x_cond = pred, sample
            self._inside = True
            try:
                uncond = prediction_of(self.denoiser(*args, **{**kwargs, **self.uncond_inputs()}))
            finally:
                self._inside = False
            x_uncond = sample
            self.extra_calls += 1
        else:
            self.without_cfg = True
            return
        values = noise_magnitude(self.conversion(uncond, x_uncond, timestep), self.conversion(cond, x_cond, timestep))
        self._sum = values if self._sum is None else self._sum + values
        self.counted += 1

    def values(self) -> np.ndarray:
        """Mean magnitude per sample (float32), NaN when there was no unconditional pass."""
        if self._sum is None or self.counted == 0:
            return np.full(self.batch_size, np.nan, dtype=np.float32)
        return (self._sum / self.counted).detach().cpu().numpy().astype(np.float32)

    def __enter__(self) -> NoiseMagnitudeRecorder:
        self._handle = self.denoiser.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
