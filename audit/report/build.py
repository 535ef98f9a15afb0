"""``memaudit report RUN``: ``RUN/report/index.html`` (self-contained), ``summary.json`` and the
plots as PNG."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from audit.errors import InputError
from audit.report import html as H
from audit.report import plots
from audit.report import screen as S
from audit.report.baseline import generated_pairs, generated_quantiles, generated_to_train, quantiles, train_to_train
from audit.report.query import RunQuery
from audit.report.stats import LABEL_RANK, LABELS, summarise
from audit.report.tables import read_run, run_thresholds
from audit import layout
from audit.location import Location
from audit.remote import push_tree
from audit.files import write_bytes_atomic

log = logging.getLogger(__name__)
REPORT_DIR = layout.REPORT
TABLE_ROWS = 1000  # prompts listed on the page, highest score first
PROMPT_COLUMNS = (
    ("prompt", "prompt"), ("n_samples", "samples"), ("score", "score"), ("flagged", "flagged"),
    ("p_value", "p-value"), ("n_matching", "matching verbatim"), ("n_retrieved", "retrieved verbatim"),
    ("n_template", "template"), ("n_low_information", "low information"),
    ("clique_size", "largest clique"), ("noise_magnitude", "noise magnitude"), ("best_cosine", "best cosine"),
    ("best_split_product", "best split-product"), ("min_tiled_l2", "min tiled L2"), ("prompt_id", "prompt id"),
)


def write_report(run_path: str | Path | Location, gallery_size: int = 24, baseline_size: int = 2000,
                 table_size: int = TABLE_ROWS) -> Location:
    """Write the report of a run (re-written from the current tables on every call); an
    object-store run's report is published to its ``report/`` prefix. Returns index.html's place.
    Every number is a DuckDB aggregate over the run's complete shards (:mod:`audit.report.query`);
    the page lists the ``table_size`` highest-scoring prompts (all of them are in prompt_scores/)."""
    store, info = read_run(run_path)
    q = RunQuery(store)
    q.require_results()
    reference = _reference(info)
    out = store.path / REPORT_DIR

    summary = summarise(q)
    thresholds = run_thresholds(store, info)
    top = generated_to_train(q, summary["samples"])
    baseline = train_to_train(reference, baseline_size) if reference else np.zeros(0, np.float32)
    figures = {
        "calibration": plots.calibration_histograms(_null(reference), generated_pairs(q, summary["samples"]), thresholds,
                                                    out / "calibration.png"),
        "similarity": plots.similarity_histogram(top.drawn, baseline, out / "similarity.png", top.n),
        "detectors": plots.detector_distributions(_audited(q), out / "detectors.png",
                                                  "Detector signals per " + ("escalated prompt" if q.screened
                                                                             else "prompt")),
    }
    screen: dict[str, Any] | None = None
    if q.screened:
        screen = S.funnel(q, info)
        points = S.screen_points(q)
        figures["screen"] = plots.screen_histogram(points["score"], points["escalated"], points["flagged"],
                                                   screen["settings"].get("threshold"), screen["top_cutoff"],
                                                   out / "screen.png")
    pairs = _gallery(q, reference, gallery_size)
    rows, flagged = _prompt_rows(q, table_size, summary["flagged_prompts"]["count"])
    summary.update({
        "run": {k: info.get(k) for k in ("run_id", "model_name", "checkpoint_id", "created_at")},
        "run_path": store.full_location,
        "reference": str(reference) if reference else None,
        "thresholds": {**thresholds, "clique_min": info["config"]["detection"]["clique_min"]},
        "expected_false": {"matching_verbatim": thresholds["verbatim_rate"],
                           "retrieved_verbatim": thresholds["verbatim_rate"],
                           "template_verbatim": thresholds["template_rate"]},
        "similarity": {"generated_to_train": generated_quantiles(q, top),
                       "train_to_train": quantiles(baseline)},
        "plots": {name: path.name for name, path in figures.items()},
        "gallery": [{k: v for k, v in p.items() if not k.endswith("_uri")} for p in pairs],
        "flagged": [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "score": r["score"]} for r in flagged],
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


# The page's order: score, then (ties: every prompt a screen decided scores 0) the higher screen
# score, then the id.
PROMPT_ORDER = "score desc, case when isfinite(screen_score) then screen_score end desc nulls last, prompt_id"


def _prompt_rows(q: RunQuery, limit: int, n_flagged: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prompts the page lists (the first ``limit`` in its order) and every flagged prompt
    (``n_flagged`` of them), in its order, with their texts, from one top-N over prompt_scores/:
    the flagged rows first, then the highest unflagged ones; the page's first ``limit`` are among
    them. Texts are joined to those rows only (a window over every row would hold them all)."""
    rows = q.arrow(f"""select s.*, coalesce(p.prompt, '') as prompt
                       from (select * exclude (filename, file_row_number) from {{prompt_scores}}
                             order by flagged desc, {PROMPT_ORDER} limit {int(n_flagged) + int(limit)}) s
                       left join {{prompts}} p using (prompt_id) order by {PROMPT_ORDER}""").to_pylist()
    for r in rows:
        r["flagged"] = bool(r["flagged"])
    return rows[:limit], [r for r in rows if r["flagged"]]


def _audited(q: RunQuery) -> pa.Table:
    """The prompts the full audit scored: in a screened run the escalated ones (the others have
    no samples, so no detector signal), else every prompt — the detector plot's columns only."""
    columns = ", ".join(["flagged", "n_samples", "clique_size"] + [n for n, _ in plots.SIGNALS if n != "clique_fraction"])
    where = "where coalesce(escalated, false)" if q.screened else ""
    return q.arrow(f"select {columns} from {{prompt_scores}} {where}")


def _gallery(q: RunQuery, reference: Path | None, size: int) -> list[dict[str, Any]]:
    """The strongest verified pair of each prompt (so one prompt's many copies, or copies of
    duplicated training items, do not fill it): label (matching > retrieved > template), then the
    lowest tiled L2, then the first in table order. Only pairs with a copy label take part: a
    sample that has one has it as its strongest label (they outrank low information)."""
    if size <= 0 or not q.has(layout.MATCHES):
        return []
    copied = ", ".join(f"'{label}'" for label in LABELS)
    top = q.arrow(f"""
        with copies as (select *, {LABEL_RANK} as strength from {{matches}}
                        where status = 'ok' and label in ({copied})),
             best as (select sample_id, max(strength) as strength from copies group by sample_id),
             chosen as (select c.* from copies c join best b using (sample_id, strength)
                        qualify row_number() over (partition by c.prompt_id
                                                   order by c.strength desc, c.tiled_l2, c.filename, c.file_row_number) = 1)
        select * exclude (file_row_number, strength) from chosen
        order by strength desc, tiled_l2, sample_id limit {int(size)}""").to_pylist()
    if not top:
        return []
    # the images are read from the samples shards of the pairs' plan shards only (a few files)
    source = q.of_shards(layout.SAMPLES, {Path(m.pop("filename")).stem for m in top})
    generated = dict(q.rows(f"select sample_id, image_png from {source} where sample_id in (select unnest(?))",
                            [[m["sample_id"] for m in top]])) if source else {}
    prompt_text = dict(q.rows("select prompt_id, prompt from {prompts} where prompt_id in (select unnest(?))",
                              [[m["prompt_id"] for m in top]]))
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
        prompts=H.sortable_table("prompts", columns, rows, row_class="flagged", gaps=screen is not None),
        prompts_total=summary["prompts"])


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
