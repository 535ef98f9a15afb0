"""The screen in the report and the comparison (docs/screening.md): the funnel screened →
escalated → flagged, each a rate with its 95% Wilson interval, and each prompt's screen columns.

Everything here reads ``escalation/escalation.parquet`` (the screen's decisions) beside
``prompt_scores/`` (the full audit's flags); a run without the file was not screened and gets no
screen section at all.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from audit.report.stats import rate
from audit.screen.escalate import top_count

# The per-prompt table's screen columns (prompt_scores/ holds them in a screened run).
SCREEN_COLUMNS = (
    ("screen_score", "screen score"), ("escalated", "escalated"), ("escalation", "escalated because"),
    ("screen_noise_magnitude", "screen noise magnitude"), ("screen_alignment", "screen alignment"),
)


def screen_scores(escalation: pa.Table) -> np.ndarray:
    """Each screened prompt's screen_score, NaN where the screen could not measure it."""
    return np.array([np.nan if v is None else v for v in escalation.column("screen_score").to_pylist()], np.float64)


def flag_mask(escalation: pa.Table, scores: pa.Table) -> np.ndarray:
    """Per row of ``escalation``: whether the full audit flagged the prompt (False when it has no
    complete prompt_scores row)."""
    flags = dict(zip(scores.column("prompt_id").to_pylist(), scores.column("flagged").to_pylist()))
    return np.array([bool(flags.get(pid)) for pid in escalation.column("prompt_id").to_pylist()], bool)


def funnel(escalation: pa.Table, scores: pa.Table, info: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``screen``: the settings (run.json ``config.screen``), the funnel and the
    escalation reasons. ``screened`` is a share of the planned prompts, ``escalated`` of the
    screened ones, ``flagged`` of the escalated ones that detection scored."""
    settings = info["config"].get("screen") or {}
    ids = escalation.column("prompt_id").to_pylist()
    escalated = np.array(escalation.column("escalated").to_pylist(), bool)
    scored = set(scores.column("prompt_id").to_pylist())
    audited = escalated & np.array([pid in scored for pid in ids], bool)
    flagged = int((flag_mask(escalation, scores) & audited).sum())
    score = screen_scores(escalation)
    reasons = Counter(r for r in escalation.column("escalation").to_pylist() if r)
    top = top_count(settings.get("top"), len(ids))
    by_top = [s for s, r in zip(score, escalation.column("escalation").to_pylist())
              if r and "top" in r.split("+") and np.isfinite(s)]
    planned = int(info.get("prompts", {}).get("n_prompts") or len(ids))
    return {
        "settings": settings,
        "screened": rate(len(ids), planned),
        "measured": rate(int(np.isfinite(score).sum()), len(ids)),
        "escalated": rate(int(escalated.sum()), len(ids)),
        "flagged": rate(flagged, int(audited.sum())),
        "flagged_of_screened": rate(flagged, len(ids)),
        "escalated_not_scored": int(escalated.sum() - audited.sum()),
        "by_reason": dict(sorted(reasons.items())),
        "top_count": top,
        "top_cutoff": float(min(by_top)) if by_top else None,
    }


def funnel_cards(screen: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's funnel cards, one per stage: its count of its total, the share with its 95%
    Wilson interval."""
    stages = (("screened prompts", "screened", "of the planned prompts"),
              ("escalated to the full audit", "escalated", "of the screened prompts"),
              ("flagged (of escalated)", "flagged", "of the escalated prompts audited"))
    cards = []
    for title, key, of in stages:
        r = screen[key]
        low, high = r["ci95"]
        cards.append({"title": title, "value": f"{r['count']} / {r['of']}", "id": f"funnel-{key}",
                      "note": f"{100 * r['rate']:.1f}% {of} (95% CI {100 * low:.1f}–{100 * high:.1f}%)"})
    return cards


def settings_note(screen: dict[str, Any]) -> str:
    """One line: how prompts were screened and why they were escalated."""
    s = screen["settings"]
    rules = [f"at screen score ≥ {s['threshold']:g}"] if s.get("threshold") is not None else []
    top = s.get("top")
    if top is not None:
        share = f"{100 * top:g}%" if isinstance(top, float) else f"{top}"
        rules.append(f"among the top {share} ({screen['top_count']} prompts)")
    reasons = ", ".join(f"{reason} {n}" for reason, n in screen["by_reason"].items()) or "none"
    unmeasured = screen["measured"]["of"] - screen["measured"]["count"]
    return (f"Each prompt screened on {s.get('seeds')} seeds; escalated {' or '.join(rules) or 'by no rule'}. "
            f"Escalated because: {reasons}."
            + (f" {unmeasured} prompts could not be measured (escalated: a failure never decides)." if unmeasured
               else ""))
