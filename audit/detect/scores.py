"""Per-prompt memorization score and flag, from the evidence of one prompt's samples (pure).

``score`` ranks prompts: the largest fraction of the prompt's samples that is evidence of
copying — verified pixel copies of the prompt's own training image (Carlini's extraction,
Webster's matching verbatim), or the largest clique of mutually near-identical samples when it
reaches ``clique_min`` (Carlini's criterion, usable without any reference set), not counting
members verified as copies of another training image (Webster's retrieved verbatim: they show
that image's caption is memorized, not this one).

``flagged`` is a test, not a cut on the score (docs/calibration.md, "The flag"): could false
labels alone have produced this much evidence at this sample count? Copies: with a per-sample
false-verbatim rate ``p`` (the calibration's upper bound), the chance of at least ``x`` false
copies among ``n`` samples is the binomial tail. Cliques: with a per-pair false rate ``q``, the
expected number of cliques of size ``c`` among ``n`` samples made of false pairs alone is
``C(n, c) q^(c(c-1)/2)``, which bounds the chance of one. The prompt is flagged when the smaller
of the two, doubled (Bonferroni, two tests), is at most ``detection.flag_fpr``. A prompt that
copies in a fixed share of its seeds gains evidence with every sample, so more samples can only
add flags; a fraction cut (the old ``score >= 0.5``) instead loses a prompt that copies in 30% of
seeds as ``n`` grows. The noise magnitude (Wen et al.) and the best copy similarity are reported
beside it, not folded in: their scale depends on the model and the embedding.
"""

from __future__ import annotations

import math

from scipy.stats import binom


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


def copies_p_value(n: int, copies: int, rate: float) -> float:
    """P(at least ``copies`` false copies among ``n`` samples), each false with ``rate``."""
    if copies <= 0 or n <= 0:
        return 1.0
    return float(binom.sf(copies - 1, n, min(max(rate, 0.0), 1.0)))


def clique_p_value(n: int, size: int, pair_rate: float, minimum: int) -> float:
    """Bound on P(a clique of ``size`` among ``n`` samples from false pairs alone): the expected
    number of such cliques, ``C(n, size) * pair_rate^(size (size-1) / 2)``; 1 below ``minimum``."""
    if size < max(2, minimum) or n < size:
        return 1.0
    if pair_rate <= 0:
        return 0.0
    log_bound = math.log(math.comb(n, size)) + size * (size - 1) / 2 * math.log(min(pair_rate, 1.0))
    return float(math.exp(min(log_bound, 0.0)))


def flag_p_value(n: int, copies: int, clique: int, minimum: int, verbatim_rate: float, pair_rate: float) -> float:
    """The prompt's p-value: the stronger of the two kinds of evidence, Bonferroni-adjusted."""
    return min(1.0, 2 * min(copies_p_value(n, copies, verbatim_rate), clique_p_value(n, clique, pair_rate, minimum)))
