"""The screen in the report and the comparison (docs/screening.md): the funnel screened →
escalated → flagged, each a rate with its 95% Wilson interval, and each prompt's screen columns.

Everything here reads ``escalation/escalation.parquet`` (the screen's decisions) beside
``prompt_scores/`` (the full audit's flags), joined by DuckDB (:mod:`audit.report.query`); a run
without the file was not screened and gets no screen section at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from audit.report.query import RunQuery
from audit.report.stats import rate
from audit.screen.escalate import top_count

# The per-prompt table's screen columns (prompt_scores/ holds them in a screened run).
SCREEN_COLUMNS = (
    ("screen_score", "screen score"), ("escalated", "escalated"), ("escalation", "escalated because"),
    ("screen_noise_magnitude", "screen noise magnitude"), ("screen_alignment", "screen alignment"),
)


def screen_points(q: RunQuery) -> dict[str, np.ndarray]:
    """Per screened prompt: its screen_score (NaN where the screen could not measure it), whether
    it was escalated and whether the full audit flagged it (False without a complete
    prompt_scores row) — the screen plot's points, as arrays."""
    found = q.numpy("""select cast(e.screen_score as double) as score, e.escalated,
                              coalesce(s.flagged, false) as flagged
                       from {escalation} e left join {prompt_scores} s using (prompt_id)""")
    score = found["score"].astype(np.float64)
    return {"score": score, "escalated": found["escalated"].astype(bool), "flagged": found["flagged"].astype(bool)}


def funnel(q: RunQuery, info: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``screen``: the settings (run.json ``config.screen``), the funnel and the
    escalation reasons. ``screened`` is a share of the planned prompts, ``escalated`` of the
    screened ones, ``flagged`` of the escalated ones that detection scored."""
    settings = info["config"].get("screen") or {}
    screened, measured, escalated, audited, flagged = (int(v or 0) for v in q.one("""
        select count(*), count(*) filter (where isfinite(e.screen_score)), count(*) filter (where e.escalated),
               count(*) filter (where e.escalated and s.prompt_id is not null),
               count(*) filter (where e.escalated and s.prompt_id is not null and s.flagged)
        from {escalation} e left join {prompt_scores} s using (prompt_id)"""))
    reasons = dict(q.rows("""select escalation, count(*) from {escalation} where escalation <> ''
                            group by escalation order by escalation"""))
    (cutoff,) = q.one("""select min(screen_score) from {escalation}
                         where list_contains(string_split(escalation, '+'), 'top') and isfinite(screen_score)""")
    top = top_count(settings.get("top"), screened)
    planned = int(info.get("prompts", {}).get("n_prompts") or screened)
    return {
        "settings": settings,
        "screened": rate(screened, planned),
        "measured": rate(measured, screened),
        "escalated": rate(escalated, screened),
        "flagged": rate(flagged, audited),
        "flagged_of_screened": rate(flagged, screened),
        "escalated_not_scored": escalated - audited,
        "by_reason": {str(k): int(v) for k, v in reasons.items()},
        "top_count": top,
        "top_cutoff": float(cutoff) if cutoff is not None else None,
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
