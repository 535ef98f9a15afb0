"""Per-prompt memorization score and flag, from the signals of one prompt's samples (pure).

score = the largest fraction of the prompt's samples that is evidence of copying: either
verified pixel copies of the prompt's own training image (Carlini's extraction, Webster's
matching verbatim), or the largest clique of mutually near-identical samples when it reaches
``clique_min`` (Carlini's criterion, usable without any reference set) — not counting members
verified as copies of another training image (Webster's retrieved verbatim: they show that
image's caption is memorized, not this one). A prompt is flagged at
``flag_score``. The noise magnitude (Wen et al.) and the best copy similarity are reported beside
it, not folded in: their scale depends on the model and the embedding, the fractions do not.
"""

from __future__ import annotations

import math


def clique_min(setting: int | str, n_samples: int) -> int:
    """Carlini et al. flag 10 near-identical samples of 500: the same share, at least 3."""
    if setting != "auto":
        return int(setting)
    return max(3, math.ceil(10 * n_samples / 500))


def memorization_score(n_samples: int, n_matching: int, clique_size: int, minimum: int) -> float:
    if n_samples <= 0:
        return 0.0
    clique_part = clique_size / n_samples if clique_size >= minimum else 0.0
    return max(n_matching / n_samples, clique_part)
