"""``memaudit compare RUN_A RUN_B``: what changed between two audits (e.g. two checkpoints of one
model): rate deltas, prompts newly memorized and no longer memorized, as HTML and JSON, and a
release gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from audit.report import html as H
from audit.report import screen as S
from audit.report.query import RunQuery, connect
from audit.report.stats import LABELS, summarise
from audit.errors import InputError
from audit.report.tables import read_run, run_thresholds
from audit import layout
from audit.location import Location
from audit.remote import push_tree
from audit.files import write_bytes_atomic

SETTINGS = ("generation", "detection", "embedding")
SCREEN_ROWS = 1000  # prompts the comparison's screen table lists, highest screen score first


def _load(path: str | Path, con: Any, prefix: str) -> dict[str, Any]:
    """One side of the comparison: its views (named ``prefix`` + table) on the shared DuckDB
    connection, its summary, thresholds and funnel."""
    store, info = read_run(path)
    q = RunQuery(store, con, prefix)
    q.require_results()
    return {
        "info": info, "path": store.full_location, "query": q,
        "summary": summarise(q),
        "thresholds": run_thresholds(store, info),
        "screen": S.funnel(q, info) if q.screened else None,
    }


def threshold_identity(thresholds: dict[str, Any]) -> dict[str, Any]:
    """What two runs must share for their verdicts to mean the same: the thresholds, their source
    and the calibration they came from."""
    calibration = thresholds.get("calibration") or {}
    return {"source": thresholds["source"], "match_l2": round(float(thresholds["match_l2"]), 6),
            "template_similarity": round(float(thresholds["template_similarity"]), 6),
            "low_information": bool(thresholds.get("low_information")), "flag_fpr": thresholds.get("flag_fpr"),
            "calibration": {k: calibration.get(k) for k in ("model_id", "index", "images", "seed", "created_at")}
            if calibration else None}


def compare_runs(path_a: str | Path, path_b: str | Path, allow_different_thresholds: bool = False,
                 screen_rows: int = SCREEN_ROWS) -> dict[str, Any]:
    """What changed from run A to run B; refused (InputError) when their verdicts come from
    different thresholds or calibrations, unless ``allow_different_thresholds``. Prompts are
    matched by DuckDB joins over both runs' shards; the lists hold the flagged prompts, the screen
    table the ``screen_rows`` highest screen scores."""
    con = connect()
    a, b = _load(path_a, con, "a_"), _load(path_b, con, "b_")
    ida, idb = threshold_identity(a["thresholds"]), threshold_identity(b["thresholds"])
    if ida != idb and not allow_different_thresholds:
        differing = ", ".join(f"{k}: {ida.get(k)} vs {idb.get(k)}" for k in ida if ida.get(k) != idb.get(k))
        raise InputError(f"{a['path']} and {b['path']} were detected with different thresholds ({differing}); their "
                         "rates do not compare. Audit both against the same calibrated reference, or pass "
                         "--allow-different-calibration to compare anyway")
    q = a["query"]
    common, only_a, only_b = _overlap(q, a["summary"]["prompts"], b["summary"]["prompts"])
    screened = a["screen"] is not None or b["screen"] is not None
    rates = {"flagged_prompts": _delta(a["summary"]["flagged_prompts"], b["summary"]["flagged_prompts"])}
    for label in LABELS:
        rates[f"samples_{label}"] = _delta(a["summary"]["samples_by_label"][label], b["summary"]["samples_by_label"][label])
    result = {
        "a": _meta(a), "b": _meta(b),
        "common_prompts": common,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "rates": rates,
        **_listed(q, screened),
        "settings_differences": _differences(a["info"]["config"], b["info"]["config"]),
        "thresholds": {"a": ida, "b": idb, "same": ida == idb},
    }
    if screened:  # two runs without a screen compare exactly as before
        total, rows = _screen_prompts(q, screen_rows)
        result["screen"] = {"a": a["screen"], "b": b["screen"], "prompts": rows}
        if total > len(rows):
            result["screen"]["prompts_total"] = total
    return result


def _overlap(q: RunQuery, n_a: int, n_b: int) -> tuple[int, int, int]:
    """Prompts scored by both runs, by A only and by B only. A prompt id is 16 hex digits
    (docs/schema.md), so each run's ids come back as one sorted uint64 array (8 bytes a prompt)
    and are intersected by NumPy; a hash join of 10⁶ ids in DuckDB holds about 100 MB. Ids that are
    not 16 hex digits (a hand-made table) are matched by that join instead."""
    ids = []
    for side, n in (("a_", n_a), ("b_", n_b)):
        column = q.arrow(f"select try_cast('0x' || prompt_id as ubigint) as id from {side}prompt_scores "
                         "where length(prompt_id) = 16").column("id")
        if len(column) != n or column.null_count:
            (common,) = q.one("select count(*) from a_prompt_scores join b_prompt_scores using (prompt_id)")
            return int(common), n_a - int(common), n_b - int(common)
        ids.append(np.sort(column.to_numpy()))
    common = len(np.intersect1d(ids[0], ids[1], assume_unique=True))
    return common, n_a - common, n_b - common


# Either run's prompt text (B's first), joined to one of the comparison's queries.
_TEXT = """left join b_prompts pb using (prompt_id) left join a_prompts pa using (prompt_id)"""
_TEXT_COLUMN = "coalesce(nullif(pb.prompt, ''), pa.prompt, '') as prompt"


def _listed(q: RunQuery, screened: bool) -> dict[str, list[dict[str, Any]]]:
    """The prompts both runs scored that either flagged, by id, with both scores (and both screen
    scores when a run was screened), split into newly, no longer and still memorized.

    The flagged ids are fetched first, then each table's rows for them (a semi join built on the
    few ids), and only those few rows are joined: DuckDB cannot estimate joins between views of
    shards, and may otherwise build a hash table of a run's 10⁶ prompts."""
    flagged = q.arrow("select prompt_id from a_prompt_scores where flagged "
                      "union select prompt_id from b_prompt_scores where flagged")
    q.con.register("flagged_ids", flagged)
    for view, columns in (("a_prompt_scores", "score, flagged"), ("b_prompt_scores", "score, flagged"),
                          ("a_prompts", "prompt"), ("b_prompts", "prompt"),
                          ("a_escalation", "screen_score"), ("b_escalation", "screen_score")):
        q.con.register(f"flagged_{view}", q.arrow(f"select prompt_id, {columns} from {view} "
                                                  "where prompt_id in (select prompt_id from flagged_ids)"))
    screen = (", cast(ea.screen_score as double) as screen_score_a, cast(eb.screen_score as double) as screen_score_b"
              if screened else "")
    rows = q.arrow(f"""
        select prompt_id, {_TEXT_COLUMN}, cast(sa.score as double) as score_a, cast(sb.score as double) as score_b{screen},
               coalesce(sa.flagged, false) as in_a, coalesce(sb.flagged, false) as in_b
        from flagged_a_prompt_scores sa join flagged_b_prompt_scores sb using (prompt_id)
             left join flagged_b_prompts pb using (prompt_id) left join flagged_a_prompts pa using (prompt_id)
             left join flagged_a_escalation ea using (prompt_id) left join flagged_b_escalation eb using (prompt_id)
        order by prompt_id""").to_pylist()
    lists: dict[str, list[dict[str, Any]]] = {"newly_memorized": [], "no_longer_memorized": [], "still_memorized": []}
    for row in rows:
        in_a, in_b = row.pop("in_a"), row.pop("in_b")
        lists["still_memorized" if in_a and in_b else "newly_memorized" if in_b else "no_longer_memorized"].append(row)
    return lists


def _screen_prompts(q: RunQuery, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """How many prompts either run screened or scored, and the first ``limit`` of them with their
    screen score, escalation and flag in A and in B (None where that run did not screen or score
    it), highest screen score first."""
    ids = """select prompt_id from a_prompt_scores union select prompt_id from b_prompt_scores
             union select prompt_id from a_escalation union select prompt_id from b_escalation"""
    (total,) = q.one(f"select count(*) from ({ids})")
    rows = q.arrow(f"""
        select prompt_id, {_TEXT_COLUMN},
               cast(ea.screen_score as double) as screen_score_a, cast(eb.screen_score as double) as screen_score_b,
               cast(eb.screen_score as double) - cast(ea.screen_score as double) as screen_score_delta,
               ea.escalated as escalated_a, eb.escalated as escalated_b, sa.flagged as flagged_a, sb.flagged as flagged_b
        from ({ids}) {_TEXT}
             left join a_escalation ea using (prompt_id) left join b_escalation eb using (prompt_id)
             left join a_prompt_scores sa using (prompt_id) left join b_prompt_scores sb using (prompt_id)
        order by greatest(ea.screen_score, eb.screen_score) desc nulls last, prompt_id
        limit {int(limit)}""").to_pylist()
    return int(total), rows


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
