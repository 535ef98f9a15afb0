"""The report's numbers: rates with Wilson score intervals, per-label counts, headline summary."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from scipy.stats import binomtest, norm

from audit.detect.verify import LABEL_ORDER, LOW_INFORMATION

LABELS = ("matching_verbatim", "retrieved_verbatim", "template_verbatim")  # the copy labels, strongest first
Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, ``z`` standard errors wide (95% by default),
    from SciPy; (0, 0) for no trials, where SciPy has no interval (a rate of nothing)."""
    if trials <= 0:
        return 0.0, 0.0
    interval = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=1 - 2 * float(norm.sf(z)),
                                                                    method="wilson")
    return max(0.0, float(interval.low)), min(1.0, float(interval.high))


def rate(successes: int, trials: int) -> dict[str, Any]:
    low, high = wilson(successes, trials)
    return {"count": int(successes), "of": int(trials), "rate": successes / trials if trials else 0.0,
            "ci95": [low, high]}


def best_labels(matches: pa.Table | None) -> dict[str, str]:
    """Each sample's strongest verified label (matching > retrieved > template > low information)."""
    if matches is None or matches.num_rows == 0:
        return {}
    best: dict[str, str] = {}
    for sid, label, status in zip(matches.column("sample_id").to_pylist(), matches.column("label").to_pylist(),
                                  matches.column("status").to_pylist()):
        if status == "ok" and LABEL_ORDER.get(label, 0) > LABEL_ORDER.get(best.get(sid, ""), 0):
            best[sid] = label
    return best


def summarise(scores: pa.Table, samples_status: pa.Table, matches: pa.Table | None) -> dict[str, Any]:
    """Headline numbers: prompts, samples, flagged prompts, samples and prompts by best verified
    label, each as a rate with its 95% Wilson interval."""
    n_prompts = scores.num_rows
    flagged = int(np.sum(scores.column("flagged").to_numpy(zero_copy_only=False)))
    status = samples_status.column("status").to_pylist()
    n_ok = sum(s == "ok" for s in status)
    labels = best_labels(matches)
    by_label = {label: sum(v == label for v in labels.values()) for label in LABELS}
    prompt_of = dict(zip(matches.column("sample_id").to_pylist(), matches.column("prompt_id").to_pylist())) \
        if matches is not None else {}
    prompts_by_label = {label: len({prompt_of[s] for s, v in labels.items() if v == label}) for label in LABELS}
    return {
        "prompts": n_prompts,
        "samples": len(status),
        "samples_ok": n_ok,
        "samples_error": len(status) - n_ok,
        "flagged_prompts": rate(flagged, n_prompts),
        "samples_by_label": {label: rate(by_label[label], n_ok) for label in LABELS},
        "prompts_by_label": {label: rate(prompts_by_label[label], n_prompts) for label in LABELS},
        "samples_low_information": rate(sum(v == LOW_INFORMATION for v in labels.values()), n_ok),
        "verified_pairs": int(sum(1 for v in (matches.column("label").to_pylist() if matches is not None else [])
                                  if v in LABELS)),
    }
