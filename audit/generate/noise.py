"""Wen et al. (ICLR 2024): the magnitude of the text-conditional noise prediction.

During classifier-free guidance the denoiser is called on ``[x_t, x_t]`` with
``[uncond, cond]`` embeddings and returns ``[eps(x_t, ∅), eps(x_t, c)]``; diffusers then splits
the output with ``chunk(2)`` in that order. A forward hook on the denoiser reads both halves and
accumulates ``||eps(x_t, c) - eps(x_t, ∅)||_2`` per sample over the first K calls. Memorized
prompts have large values from the first step. No extra denoiser call is made.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import numpy as np
import torch


def noise_magnitude(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of the text-conditional part of the noise prediction."""
    return (cond.float() - uncond.float()).flatten(1).norm(dim=1)


class NoiseMagnitudeRecorder:
    """Context manager recording the mean noise magnitude over the first ``first_k`` denoiser
    calls of one pipeline call of ``batch_size`` samples.

    For first-order schedulers one call is one step; schedulers that evaluate the denoiser twice
    per step (Heun) count each evaluation. Without CFG the values are NaN.
    """

    def __init__(self, denoiser: torch.nn.Module, batch_size: int, first_k: int) -> None:
        self.denoiser, self.batch_size, self.first_k = denoiser, batch_size, first_k
        self.calls = 0
        self.counted = 0
        self.without_cfg = False
        self._sum: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        self.calls += 1
        if self.counted >= self.first_k:
            return
        pred = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if pred.shape[0] != 2 * self.batch_size:
            self.without_cfg = True
            return
        uncond, cond = pred.chunk(2)
        values = noise_magnitude(uncond, cond)
        self._sum = values if self._sum is None else self._sum + values
        self.counted += 1

    def values(self) -> np.ndarray:
        """Mean magnitude per sample (float32), NaN when CFG was off."""
        if self._sum is None or self.counted == 0:
            return np.full(self.batch_size, np.nan, dtype=np.float32)
        return (self._sum / self.counted).detach().cpu().numpy().astype(np.float32)

    def __enter__(self) -> NoiseMagnitudeRecorder:
        self._handle = self.denoiser.register_forward_hook(self._hook)
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
