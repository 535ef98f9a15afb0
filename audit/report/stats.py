"""The report's numbers: rates with Wilson score intervals, per-label counts, headline summary
(aggregated by DuckDB, :mod:`audit.report.query`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from scipy.stats import binomtest, norm

from audit.detect.verify import LABEL_ORDER, LOW_INFORMATION
from audit.report.query import RunQuery

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


LABEL_RANK = "case label " + " ".join(f"when '{label}' then {rank}" for label, rank in LABEL_ORDER.items()) \
    + " else 0 end"  # SQL: a label's strength, as LABEL_ORDER


def best_label_counts(q: RunQuery) -> tuple[dict[str, tuple[int, int]], int]:
    """Per label: how many samples have it as their strongest verified label, and of how many
    prompts; and how many pairs carry a copy label, whatever their status (one DuckDB pass over
    matches/, :func:`best_labels` at scale)."""
    copied = ", ".join(f"'{label}'" for label in LABELS)
    rows = q.rows(f"""
        with ranked as (select sample_id, prompt_id, label, status, {LABEL_RANK} as strength from {{matches}}),
             best as (select arg_max(label, strength) filter (where status = 'ok') as label,
                             any_value(prompt_id) filter (where status = 'ok') as prompt_id,
                             count(*) filter (where label in ({copied})) as pairs
                      from ranked where strength > 0 group by sample_id)
        select label, count(*), count(distinct prompt_id), sum(pairs) from best group by label""")
    pairs = sum(int(n or 0) for *_, n in rows)
    return {label: (int(samples), int(prompts)) for label, samples, prompts, _ in rows if label is not None}, pairs


def summarise(q: RunQuery) -> dict[str, Any]:
    """Headline numbers: prompts, samples, flagged prompts, samples and prompts by best verified
    label, each as a rate with its 95% Wilson interval; counted by DuckDB over the run's shards."""
    n_prompts, flagged = q.one("select count(*), count(*) filter (where flagged) from {prompt_scores}")
    n_samples, n_ok = q.one("select count(*), count(*) filter (where status = 'ok') from {samples}")
    labels, pairs = best_label_counts(q)
    return {
        "prompts": int(n_prompts),
        "samples": int(n_samples),
        "samples_ok": int(n_ok),
        "samples_error": int(n_samples - n_ok),
        "flagged_prompts": rate(int(flagged), int(n_prompts)),
        "samples_by_label": {label: rate(labels.get(label, (0, 0))[0], int(n_ok)) for label in LABELS},
        "prompts_by_label": {label: rate(labels.get(label, (0, 0))[1], int(n_prompts)) for label in LABELS},
        "samples_low_information": rate(labels.get(LOW_INFORMATION, (0, 0))[0], int(n_ok)),
        "verified_pairs": int(pairs),
    }
