"""``memaudit report RUN``: ``RUN/report/index.html`` (self-contained), ``summary.json`` and the
plots as PNG."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit.errors import InputError
from audit.report import html as H
from audit.report import plots
from audit.report import screen as S
from audit.report.baseline import generated_pairs, generated_to_train, train_to_train
from audit.report.stats import LABELS, best_labels, summarise
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

log = logging.getLogger(__name__)
REPORT_DIR = layout.REPORT
PROMPT_COLUMNS = (
    ("prompt", "prompt"), ("n_samples", "samples"), ("score", "score"), ("flagged", "flagged"),
    ("p_value", "p-value"), ("n_matching", "matching verbatim"), ("n_retrieved", "retrieved verbatim"),
    ("n_template", "template"), ("n_low_information", "low information"),
    ("clique_size", "largest clique"), ("noise_magnitude", "noise magnitude"), ("best_cosine", "best cosine"),
    ("best_split_product", "best split-product"), ("min_tiled_l2", "min tiled L2"), ("prompt_id", "prompt id"),
)


def write_report(run_path: str | Path | Location, gallery_size: int = 24, baseline_size: int = 2000) -> Location:
    """Write the report of a run (re-written from the current tables on every call); an
    object-store run's report is published to its ``report/`` prefix. Returns index.html's place."""
    store, info = read_run(run_path)
    scores = require(store, layout.PROMPT_SCORES)
    escalation = escalation_table(store)  # None: the run was not screened
    samples = run_samples(store, screened=escalation is not None)
    matches = complete_table(store, layout.MATCHES)
    neighbors = complete_table(store, layout.NEIGHBORS, ["sample_id", "rank", "row", "score"])
    prompt_text = prompt_texts(store)
    reference = _reference(info)
    out = store.path / REPORT_DIR

    summary = summarise(scores, samples, matches)
    thresholds = run_thresholds(store, info)
    generated = generated_to_train(neighbors)
    baseline = train_to_train(reference, baseline_size) if reference else np.zeros(0, np.float32)
    figures = {
        "calibration": plots.calibration_histograms(_null(reference), generated_pairs(matches), thresholds,
                                                    out / "calibration.png"),
        "similarity": plots.similarity_histogram(generated, baseline, out / "similarity.png"),
        "detectors": plots.detector_distributions(_audited(scores, escalation), out / "detectors.png",
                                                  "Detector signals per " + ("prompt" if escalation is None
                                                                             else "escalated prompt")),
    }
    screen: dict[str, Any] | None = None
    if escalation is not None:
        screen = S.funnel(escalation, scores, info)
        figures["screen"] = plots.screen_histogram(
            S.screen_scores(escalation), np.array(escalation.column("escalated").to_pylist(), bool),
            S.flag_mask(escalation, scores), screen["settings"].get("threshold"), screen["top_cutoff"],
            out / "screen.png")
    pairs = _gallery(store, matches, reference, prompt_text, gallery_size)
    rows = _prompt_rows(scores, prompt_text)
    summary.update({
        "run": {k: info.get(k) for k in ("run_id", "model_name", "checkpoint_id", "created_at")},
        "run_path": store.full_location,
        "reference": str(reference) if reference else None,
        "thresholds": {**thresholds, "clique_min": info["config"]["detection"]["clique_min"]},
        "expected_false": {"matching_verbatim": thresholds["verbatim_rate"],
                           "retrieved_verbatim": thresholds["verbatim_rate"],
                           "template_verbatim": thresholds["template_rate"]},
        "similarity": {"generated_to_train": _quantiles(generated), "train_to_train": _quantiles(baseline)},
        "plots": {name: path.name for name, path in figures.items()},
        "gallery": [{k: v for k, v in p.items() if not k.endswith("_uri")} for p in pairs],
        "flagged": [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "score": r["score"]}
                    for r in rows if r["flagged"]],
    })
    if screen is not None:  # a run without a screen keeps exactly its former summary
        summary["screen"] = screen
    write_bytes_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())
    document = _document(info, summary, pairs, figures, rows)
    write_bytes_atomic(out / "index.html", document.encode())
    if store.where.is_remote:
        push_tree(store.path, store.where.remote, REPORT_DIR)
        return store.where.join(REPORT_DIR, "index.html")
    return Location(out / "index.html")


def _reference(info: dict[str, Any]) -> Path | None:
    path = info["config"]["reference"].get("path")
    if not path:
        return None
    from audit.reference.locate import resolve_reference

    try:  # a reference not on this machine (a built-in one never built here) leaves the baseline out
        return resolve_reference(str(path))
    except InputError:
        return None


def _null(reference: Path | None) -> Any:
    from audit.reference.calibration import read_null

    return read_null(reference) if reference is not None else None


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    q = np.quantile(values, [0.5, 0.9, 0.99, 1.0])
    return {"n": int(values.size), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}


def _prompt_rows(scores: pa.Table, prompt_text: dict[str, str]) -> list[dict[str, Any]]:
    rows = scores.to_pylist()
    for r in rows:
        r["prompt"] = prompt_text.get(r["prompt_id"], "")
        r["flagged"] = bool(r["flagged"])
    # Ties (every prompt a screen decided scores 0) go to the higher screen score, then the id.
    rows.sort(key=lambda r: (-float(r["score"]), _descending(r.get("screen_score")), r["prompt_id"]))
    return rows


def _descending(value: float | None) -> float:
    return -float(value) if value is not None and math.isfinite(value) else math.inf


def _audited(scores: pa.Table, escalation: pa.Table | None) -> pa.Table:
    """The prompts the full audit scored: in a screened run the escalated ones (the others have
    no samples, so no detector signal), else every prompt."""
    if escalation is None:
        return scores
    return scores.filter(pc.fill_null(scores.column("escalated"), False))


def _gallery(store: Any, matches: pa.Table | None, reference: Path | None, prompt_text: dict[str, str],
             size: int) -> list[dict[str, Any]]:
    """The strongest verified pair of each prompt (so one prompt's many copies, or copies of
    duplicated training items, do not fill it): label (matching > retrieved > template), then the
    lowest tiled L2."""
    if matches is None or matches.num_rows == 0 or size <= 0:
        return []
    best = best_labels(matches)
    order = {label: i for i, label in enumerate(LABELS)}
    chosen: dict[str, dict[str, Any]] = {}
    for m in matches.filter(pc.equal(matches.column("status"), "ok")).to_pylist():
        if m["label"] in order and best.get(m["sample_id"]) == m["label"]:
            pair = m["prompt_id"]
            current = chosen.get(pair)
            if current is None or order[m["label"]] < order[current["label"]] or (
                    m["label"] == current["label"] and m["tiled_l2"] < current["tiled_l2"]):
                chosen[pair] = m
    top = sorted(chosen.values(), key=lambda m: (order[m["label"]], m["tiled_l2"], m["sample_id"]))[:size]
    if not top:
        return []
    images = complete_table(store, layout.SAMPLES, ["sample_id", "image_png"], [m["sample_id"] for m in top])
    generated = dict(zip(images.column("sample_id").to_pylist(), images.column("image_png").to_pylist())) \
        if images is not None else {}
    ref_images: dict[int, tuple[str | None, str | None, bytes | None]] = {}
    if reference is not None:
        from audit.reference.images import ReferenceImages
        from audit.reference.index import INDEX_DIR, load_manifest

        ref_images = ReferenceImages(reference, load_manifest(reference / INDEX_DIR)).get(
            np.array(sorted({int(m["row"]) for m in top})))
    pairs = []
    for m in top:
        key, caption, ref_png = ref_images.get(int(m["row"]), (m["key"], None, None))
        pairs.append({
            "sample_id": m["sample_id"], "prompt_id": m["prompt_id"], "prompt": prompt_text.get(m["prompt_id"], ""),
            "label": m["label"], "own": bool(m["own"]), "row": int(m["row"]), "key": key or m["key"],
            "caption": caption, "tiled_l2": float(m["tiled_l2"]), "rms": float(m["rms"]),
            "cosine": float(m["cosine"]), "split_product": float(m["split_product"]),
            "generated_uri": H.png_data_uri(generated.get(m["sample_id"])), "training_uri": H.png_data_uri(ref_png),
        })
    return pairs


def _document(info: dict[str, Any], summary: dict[str, Any], pairs: list[dict[str, Any]],
              figures: dict[str, Path], rows: list[dict[str, Any]]) -> str:
    """The report page (``templates/report.html.j2``): run settings, headline cards, the gallery of
    verified pairs, the plots inlined as data URIs and the sortable table of prompts; in a
    screened run also the screen's funnel and score plot, and its columns in the table."""
    screen = summary.get("screen")
    plot_uris = {name: H.file_data_uri(path.read_bytes()) for name, path in figures.items()}
    columns = PROMPT_COLUMNS if screen is None else PROMPT_COLUMNS[:5] + S.SCREEN_COLUMNS + PROMPT_COLUMNS[5:]
    return H.render(
        "report.html.j2", f"memaudit report — {info.get('model_name')} {info.get('checkpoint_id')}",
        run=summary["run"], config=info["config"], summary=summary, cards=_cards(summary), pairs=pairs,
        plots={name: uri for name, uri in plot_uris.items() if name != "screen"},
        screen=None if screen is None else {"cards": S.funnel_cards(screen), "note": S.settings_note(screen),
                                            "plot": plot_uris["screen"]},
        prompts=H.sortable_table("prompts", columns, rows, row_class="flagged", gaps=screen is not None))


def _cards(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline cards: prompts, then flagged prompts and samples by best verified label, each a
    rate with its 95% Wilson interval, each sample label beside the rate false labels alone give."""
    cards = [{"title": "prompts", "value": summary["prompts"],
              "note": f"{summary['samples']} samples, {summary['samples_error']} failed"},
             _rate_card("flagged prompts", summary["flagged_prompts"])]
    cards += [_rate_card(f"samples: {label.replace('_', ' ')}", summary["samples_by_label"][label])
              | {"expected": expected_note(summary["expected_false"][label])} for label in LABELS]
    if summary["thresholds"].get("low_information"):
        cards.append(_rate_card("samples: low information", summary["samples_low_information"]))
    return cards


def _rate_card(title: str, r: dict[str, Any]) -> dict[str, str]:
    low, high = r["ci95"]
    return {"title": title, "value": f"{r['count']} / {r['of']}",
            "note": f"{100 * r['rate']:.1f}% (95% CI {100 * low:.1f}–{100 * high:.1f}%)"}


def expected_note(expected: dict[str, Any] | None) -> str:
    """What false labels alone give: measured on the calibration's training images, or assumed."""
    if not expected:
        return "false labels alone: unknown (detected before thresholds were recorded)"
    if expected.get("of"):
        return (f"false labels alone: {100 * expected['rate']:.2f}% (≤ {100 * expected['upper']:.2f}%, "
                f"{expected['count']} of {expected['of']} training images)")
    return f"false labels alone: assumed {100 * expected['upper']:.2f}% (no calibration)"
