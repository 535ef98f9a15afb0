"""From screen signals to decisions: each prompt's ``screen_score`` and whether it goes on to the
full audit (pure numpy; docs/screening.md, "Score" and "Escalation").

Each signal is put on one scale, a robust z-score against the run's own screened prompts,
``(x − median) / (1.4826 · MAD)`` (1.4826 makes the MAD a standard deviation for normal data), the
noise magnitude (and the latent update, when measured) on a log scale (norms: positive,
right-skewed). ``screen_score`` is the mean of the z-scores, all oriented so that larger means
more memorization-like as the papers found (Wen et al.: larger magnitude; Asthana & Belagiannis:
stronger alignment; Huang et al.: larger early updates). Nothing is fitted to
labels: the median and MAD assume only that most of a run's prompts are not memorized, which is
what every published audit found (Carlini et al.: 109 of 350,000 captions).

A prompt is escalated when its score is at least ``screen.threshold`` (default 2.0: under a
normal null a prompt passes it by chance with probability between 0.2 %, two independent signals,
and 2.3 %, one signal twice), when it is among the ``screen.top`` highest scores, or when the
screen could not measure it (never decided by a failure).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from audit.schema import ESCALATION

MAD_TO_SD = 1.4826
MIN_PROMPTS = 8  # fewer screened prompts than this give no usable median/MAD: every prompt is escalated
REASON_THRESHOLD, REASON_TOP, REASON_UNMEASURED, REASON_FEW = "threshold", "top", "screen error", "too few prompts"


def robust_z(values: np.ndarray, against: np.ndarray | None = None) -> np.ndarray:
    """(x − median) / (1.4826 · MAD), the median and MAD taken over the finite values of
    ``against`` (default: ``values`` themselves; the check service scores one prompt against a
    baseline of screened prompts); NaN stays NaN. A zero MAD (more than half the values equal)
    falls back to the mean absolute deviation, then to 1."""
    basis = values if against is None else against
    finite = basis[np.isfinite(basis)]
    if finite.size == 0:
        return np.full_like(values, np.nan, dtype=np.float64)
    median = float(np.median(finite))
    spread = MAD_TO_SD * float(np.median(np.abs(finite - median)))
    if spread <= 0:
        spread = float(np.mean(np.abs(finite - median))) * math.sqrt(math.pi / 2) or 1.0
    return (values.astype(np.float64) - median) / spread


def _log(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log(values.astype(np.float64)), np.nan)


def screen_scores(noise_magnitude: np.ndarray, alignment: np.ndarray, latent_update: np.ndarray | None = None,
                  against: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None) -> tuple[np.ndarray, ...]:
    """(screen_score, z of the log noise magnitude, z of the alignment, z of the log latent update),
    NaN where unmeasured. The latent update joins the mean only when it was measured
    (``screen.steps`` > 1); its z is all NaN otherwise. ``against``: the (noise magnitude,
    alignment, latent update) of other screened prompts whose median and MAD set the scale
    (default: these prompts' own)."""
    noise_b, align_b, update_b = against if against is not None else (noise_magnitude, alignment, latent_update)
    z_noise = robust_z(_log(noise_magnitude), _log(noise_b))
    z_align = robust_z(alignment.astype(np.float64), align_b.astype(np.float64))
    if latent_update is None or update_b is None or not np.isfinite(latent_update).any():
        return (z_noise + z_align) / 2.0, z_noise, z_align, np.full(len(z_noise), np.nan)
    z_update = robust_z(_log(latent_update), _log(update_b))
    return (z_noise + z_align + z_update) / 3.0, z_noise, z_align, z_update


def top_count(top: int | float | None, n: int) -> int:
    """How many prompts ``screen.top`` escalates out of ``n``: a count, or a fraction rounded up."""
    if top is None:
        return 0
    if isinstance(top, float):
        return min(n, math.ceil(top * n))
    return min(n, int(top))


def decide(prompt_ids: list[str], noise_magnitude: np.ndarray, alignment: np.ndarray, threshold: float | None,
           top: int | float | None, latent_update: np.ndarray | None = None) -> pa.Table:
    """The escalation table (schema :data:`audit.schema.ESCALATION`), in ``prompt_ids`` order.
    Ranks order by score, highest first, ties and unmeasured prompts by prompt id (deterministic)."""
    n = len(prompt_ids)
    update = np.full(n, np.nan) if latent_update is None else latent_update
    score, z_noise, z_align, z_update = screen_scores(noise_magnitude, alignment, update)
    measured = np.isfinite(score)
    keys = sorted(range(n), key=lambda i: (not measured[i], -score[i] if measured[i] else 0.0, prompt_ids[i]))
    rank = np.empty(n, np.int64)
    rank[keys] = np.arange(n)
    reasons: list[str | None] = [None] * n
    few = int(measured.sum()) < MIN_PROMPTS
    n_top = top_count(top, n)
    for i in range(n):
        parts = []
        if not measured[i]:
            parts.append(REASON_UNMEASURED)
        elif few:
            parts.append(REASON_FEW)
        else:
            if threshold is not None and score[i] >= threshold:
                parts.append(REASON_THRESHOLD)
            if rank[i] < n_top:
                parts.append(REASON_TOP)
        reasons[i] = "+".join(parts) or None
    as32 = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
    return pa.Table.from_pydict({
        "prompt_id": list(prompt_ids), "noise_magnitude": as32(noise_magnitude), "alignment": as32(alignment),
        "z_noise_magnitude": as32(z_noise), "z_alignment": as32(z_align), "latent_update": as32(update),
        "z_latent_update": as32(z_update), "screen_score": as32(score),
        "rank": rank, "escalated": [r is not None for r in reasons], "escalation": reasons,
    }, schema=ESCALATION)


__all__ = ["decide", "robust_z", "screen_scores", "top_count"]
