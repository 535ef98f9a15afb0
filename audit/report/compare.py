"""``memaudit compare RUN_A RUN_B``: what changed between two audits (e.g. two checkpoints of one
model): rate deltas, prompts newly memorized and no longer memorized, as HTML and JSON, and a
release gate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from audit.report import html as H
from audit.report import screen as S
from audit.report.stats import LABELS, summarise
from audit.errors import InputError
from audit.report.tables import (
    complete_table,
    escalation_table,
    prompt_texts,
    read_run,
    require,
    run_samples,
    run_thresholds,
)
from audit import layout
from audit.location import Location
from audit.remote import push_tree
from audit.files import write_bytes_atomic

SETTINGS = ("generation", "detection", "embedding")


def _load(path: str | Path) -> dict[str, Any]:
    store, info = read_run(path)
    scores = require(store, layout.PROMPT_SCORES)
    escalation = escalation_table(store)  # None: not screened
    samples = run_samples(store, screened=escalation is not None)
    return {
        "info": info, "path": store.full_location,
        "summary": summarise(scores, samples, complete_table(store, layout.MATCHES)),
        "flags": dict(zip(scores.column("prompt_id").to_pylist(), (bool(f) for f in scores.column("flagged").to_pylist()))),
        "score": dict(zip(scores.column("prompt_id").to_pylist(), scores.column("score").to_pylist())),
        "text": prompt_texts(store),
        "thresholds": run_thresholds(store, info),
        "screen": S.funnel(escalation, scores, info) if escalation is not None else None,
        "screen_score": _by_prompt(escalation, "screen_score"),
        "escalated": _by_prompt(escalation, "escalated"),
    }


def _by_prompt(escalation: pa.Table | None, column: str) -> dict[str, Any]:
    """prompt_id -> one column of the screen's decisions (empty for a run without a screen)."""
    if escalation is None:
        return {}
    return dict(zip(escalation.column("prompt_id").to_pylist(), escalation.column(column).to_pylist()))


def threshold_identity(thresholds: dict[str, Any]) -> dict[str, Any]:
    """What two runs must share for their verdicts to mean the same: the thresholds, their source
    and the calibration they came from."""
    calibration = thresholds.get("calibration") or {}
    return {"source": thresholds["source"], "match_l2": round(float(thresholds["match_l2"]), 6),
            "template_similarity": round(float(thresholds["template_similarity"]), 6),
            "low_information": bool(thresholds.get("low_information")), "flag_fpr": thresholds.get("flag_fpr"),
            "calibration": {k: calibration.get(k) for k in ("model_id", "index", "images", "seed", "created_at")}
            if calibration else None}


def compare_runs(path_a: str | Path, path_b: str | Path, allow_different_thresholds: bool = False) -> dict[str, Any]:
    """What changed from run A to run B; refused (InputError) when their verdicts come from
    different thresholds or calibrations, unless ``allow_different_thresholds``."""
    a, b = _load(path_a), _load(path_b)
    ida, idb = threshold_identity(a["thresholds"]), threshold_identity(b["thresholds"])
    if ida != idb and not allow_different_thresholds:
        differing = ", ".join(f"{k}: {ida.get(k)} vs {idb.get(k)}" for k in ida if ida.get(k) != idb.get(k))
        raise InputError(f"{a['path']} and {b['path']} were detected with different thresholds ({differing}); their "
                         "rates do not compare. Audit both against the same calibrated reference, or pass "
                         "--allow-different-calibration to compare anyway")
    common = sorted(set(a["flags"]) & set(b["flags"]))
    screened = a["screen"] is not None or b["screen"] is not None

    def listed(ids: list[str]) -> list[dict[str, Any]]:
        return [{"prompt_id": p, "prompt": b["text"].get(p) or a["text"].get(p, ""),
                 "score_a": a["score"][p], "score_b": b["score"][p],
                 **({"screen_score_a": a["screen_score"].get(p), "screen_score_b": b["screen_score"].get(p)}
                    if screened else {})} for p in ids]

    new = [p for p in common if b["flags"][p] and not a["flags"][p]]
    gone = [p for p in common if a["flags"][p] and not b["flags"][p]]
    both = [p for p in common if a["flags"][p] and b["flags"][p]]
    rates = {"flagged_prompts": _delta(a["summary"]["flagged_prompts"], b["summary"]["flagged_prompts"])}
    for label in LABELS:
        rates[f"samples_{label}"] = _delta(a["summary"]["samples_by_label"][label], b["summary"]["samples_by_label"][label])
    result = {
        "a": _meta(a), "b": _meta(b),
        "common_prompts": len(common),
        "only_in_a": len(set(a["flags"]) - set(b["flags"])),
        "only_in_b": len(set(b["flags"]) - set(a["flags"])),
        "rates": rates,
        "newly_memorized": listed(new),
        "no_longer_memorized": listed(gone),
        "still_memorized": listed(both),
        "settings_differences": _differences(a["info"]["config"], b["info"]["config"]),
        "thresholds": {"a": ida, "b": idb, "same": ida == idb},
    }
    if screened:  # two runs without a screen compare exactly as before
        result["screen"] = {"a": a["screen"], "b": b["screen"], "prompts": _screen_prompts(a, b)}
    return result


def _screen_prompts(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Every prompt of either run with its screen score, escalation and flag in A and in B (None
    where that run did not screen or score it), highest screen score first."""
    ids = set(a["flags"]) | set(b["flags"]) | set(a["screen_score"]) | set(b["screen_score"])
    rows = []
    for p in ids:
        sa, sb = a["screen_score"].get(p), b["screen_score"].get(p)
        rows.append({"prompt_id": p, "prompt": b["text"].get(p) or a["text"].get(p, ""),
                     "screen_score_a": sa, "screen_score_b": sb,
                     "screen_score_delta": sb - sa if sa is not None and sb is not None else None,
                     "escalated_a": a["escalated"].get(p), "escalated_b": b["escalated"].get(p),
                     "flagged_a": a["flags"].get(p), "flagged_b": b["flags"].get(p)})
    rows.sort(key=lambda r: (-max((v for v in (r["screen_score_a"], r["screen_score_b"]) if v is not None),
                                  default=-math.inf), r["prompt_id"]))
    return rows


def gate(result: dict[str, Any], fail_if_new: bool, max_rate_increase: float | None) -> list[str]:
    """Why the release gate fails (empty: it passes)."""
    reasons = []
    if fail_if_new and result["newly_memorized"]:
        reasons.append(f"{len(result['newly_memorized'])} prompts newly memorized")
    delta = result["rates"]["flagged_prompts"]["delta"]
    if max_rate_increase is not None and delta > max_rate_increase:
        reasons.append(f"flagged-prompt rate rose by {delta:.4f} (> {max_rate_increase})")
    return reasons


def write_compare(result: dict[str, Any], out: str | Path | Location) -> Location:
    """Write compare.json and index.html to ``out`` (a folder or an object-store prefix); returns
    where index.html is."""
    where = Location.of(out)
    write_bytes_atomic(where.local / "compare.json", json.dumps(result, indent=2).encode())
    write_bytes_atomic(where.local / "index.html", _document(result).encode())
    if where.is_remote:
        push_tree(where.local, where.remote)
    return where.join("index.html")


def default_out(path_b: str | Path | Location, result: dict[str, Any]) -> Location:
    a = result["a"]
    return Location.of(path_b).join(layout.COMPARE, f"vs-{a['model_name']}-{a['checkpoint_id']}-{a['run_id']}")


def _meta(run: dict[str, Any]) -> dict[str, Any]:
    info = run["info"]
    return {"path": run["path"], "model_name": info.get("model_name"), "checkpoint_id": info.get("checkpoint_id"),
            "run_id": info.get("run_id"), "prompts": run["summary"]["prompts"], "samples": run["summary"]["samples"]}


def _delta(ra: dict[str, Any], rb: dict[str, Any]) -> dict[str, Any]:
    return {"a": ra, "b": rb, "delta": rb["rate"] - ra["rate"]}


def _differences(ca: dict[str, Any], cb: dict[str, Any]) -> dict[str, list[Any]]:
    found = {}
    for section in SETTINGS:
        for key in sorted(set(ca.get(section, {})) | set(cb.get(section, {}))):
            va, vb = ca.get(section, {}).get(key), cb.get(section, {}).get(key)
            if va != vb:
                found[f"{section}.{key}"] = [va, vb]
    if ca["model"]["path"] != cb["model"]["path"]:
        found["model.path"] = [ca["model"]["path"], cb["model"]["path"]]
    if ca.get("screen") != cb.get("screen"):  # null: not screened
        found["screen"] = [ca.get("screen"), cb.get("screen")]
    return found


FUNNEL = (("screened", "screened (of planned prompts)"), ("escalated", "escalated (of screened)"),
          ("flagged", "flagged (of escalated)"))
SCREEN_COLUMNS = (
    ("prompt", "prompt"), ("screen_score_a", "screen score A"), ("screen_score_b", "screen score B"),
    ("screen_score_delta", "change"), ("escalated_a", "escalated A"), ("escalated_b", "escalated B"),
    ("flagged_a", "flagged A"), ("flagged_b", "flagged B"), ("prompt_id", "prompt id"),
)


def _document(result: dict[str, Any]) -> str:
    """The comparison page (``templates/compare.html.j2``): rate changes (and, when a run was
    screened, both funnels), then the prompts newly, no longer and still memorized (then every
    prompt's screen score in A and B), then the settings that differ."""
    screen = result.get("screen")
    columns: tuple[tuple[str, str], ...] = (("prompt", "prompt"), ("score_a", "score A"), ("score_b", "score B"))
    if screen is not None:
        columns += (("screen_score_a", "screen score A"), ("screen_score_b", "screen score B"))
    columns += (("prompt_id", "prompt id"),)
    sections = [{"title": title, "count": len(result[key]),
                 "table": H.sortable_table(key, columns, result[key], gaps=screen is not None) if result[key] else None}
                for key, title in (("newly_memorized", "Newly memorized (flagged in B, not in A)"),
                                   ("no_longer_memorized", "No longer memorized (flagged in A, not in B)"),
                                   ("still_memorized", "Memorized in both"))]
    rates = [{"name": name.replace("_", " "), "a": _rate(r["a"]), "b": _rate(r["b"]),
              "change": f"{100 * r['delta']:+.1f} pts"} for name, r in result["rates"].items()]
    screen_view = None if screen is None else {
        "funnel": [{"name": title, "a": _stage(screen["a"], key), "b": _stage(screen["b"], key)}
                   for key, title in FUNNEL],
        "table": H.sortable_table("screen-scores", SCREEN_COLUMNS, screen["prompts"], gaps=True),
    }
    return H.render("compare.html.j2", "memaudit compare", a=result["a"], b=result["b"],
                    common_prompts=result["common_prompts"], only_in_a=result["only_in_a"],
                    only_in_b=result["only_in_b"], rates=rates, sections=sections,
                    differences=result["settings_differences"], thresholds=result["thresholds"], screen=screen_view)


def _stage(funnel: dict[str, Any] | None, key: str) -> str:
    return "not screened" if funnel is None else _rate(funnel[key])


def _rate(r: dict[str, Any]) -> str:
    """A rate as count/total = percent (95% interval)."""
    low, high = r["ci95"]
    return f"{r['count']}/{r['of']} = {100 * r['rate']:.1f}% ({100 * low:.1f}–{100 * high:.1f}%)"
