"""The screen's per-sample signals from one classifier-free-guidance pair of noise predictions
(pure math, no pipeline; docs/screening.md, "Signals").

- ``noise_magnitude``: Wen et al. (ICLR 2024), ``||ε(x_T, c) − ε(x_T, ∅)||₂`` at the sampler's
  first informative step on the initial noise x_T. This is also Asthana & Belagiannis's (ICLR
  2026) isotropic term, the norm of the score difference on pure noise at high noise: the score
  is −ε/√(1−ᾱ_t), one constant factor for every prompt at that timestep.
- ``alignment``: Asthana & Belagiannis's anisotropic term, the cosine between the unconditional
  prediction ε(x_T, ∅) and the guidance vector ε(x_T, c) − ε(x_T, ∅), taken over channels at
  every latent position and averaged over positions, with both predictions made on the same pure
  noise x_T at a low-noise timestep (the schedule's third-to-last, as in their reference code).
- ``latent_update`` (with ``screen.steps`` > 1): Huang et al. (KDD 2026), the norm of the update
  the sampler makes to the latents, ``||x_{t_{j+1}} − x_{t_j}||₂``, averaged over the first
  ``screen.steps`` steps (memorized prompts make larger early updates).
"""

from __future__ import annotations

import torch


def noise_magnitude(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of the text-conditional part of the noise prediction."""
    return (cond.double() - uncond.double()).flatten(1).norm(dim=1)


def alignment(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over latent positions of cos(ε_∅, ε_c − ε_∅) across channels. Latents are
    ``[B, C, H, W]`` (channels on dim 1) or token sequences ``[B, N, C]`` (channels last)."""
    uncond, cond = uncond.double(), cond.double()
    dim = 1 if uncond.ndim == 4 else -1
    cosine = torch.nn.functional.cosine_similarity(uncond, cond - uncond, dim=dim, eps=1e-12)
    return cosine.flatten(1).mean(dim=1)


def update_norm(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of one sampler step's change to the latents."""
    return (after.double() - before.double()).flatten(1).norm(dim=1)
