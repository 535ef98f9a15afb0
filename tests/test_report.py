"""The report (HTML in headless Chromium, summary.json, plots), compare + release gate, and the
analyst notebook, on a fresh audit of the testbed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from audit.cli import main
from audit.files import file_sha256
from audit.store import RunStore

HOSTILE = ('<script>document.body.dataset.pwned="1"</script> a cat <img src=x '
           'onerror="document.body.dataset.pwned=2"> & "quotes"')
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from audit.testbed.checkpoints import testbed_folder

    tmp = tmp_path_factory.mktemp("report")
    truth = pq.read_table(testbed_folder() / "ground_truth.parquet").to_pylist()
    chosen = [r for g, n in (("dup32", 3), ("dup8", 2), ("heldout", 2)) for r in [t for t in truth if t["group"] == g][:n]]
    (tmp / "prompts.txt").write_text("\n".join([r["caption"] for r in chosen] + [HOSTILE]) + "\n")
    args = ["run", "--set", f"run.root={tmp / 'runs'}", "--set", f"prompts.source={tmp / 'prompts.txt'}",
            "--set", "generation.prompts_per_shard=4"]
    assert main(args) == 0
    run = next((tmp / "runs").glob("*/*/*"))
    return {"run": run, "tmp": tmp, "truth": {r["caption"]: r for r in chosen}}


def test_run_writes_the_report_and_it_matches_the_tables(demo: dict, capsys: pytest.CaptureFixture) -> None:
    run = demo["run"]
    assert (run / "report" / "index.html").is_file()  # written by `memaudit run`
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report' / 'index.html'}"
    summary = json.loads((run / "report" / "summary.json").read_text())
    scores = pq.read_table(run / "prompt_scores").to_pylist()
    prompts = dict(zip(*pq.read_table(run / "prompts", columns=["prompt_id", "prompt"]).to_pydict().values()))
    assert summary["prompts"] == 8 and summary["samples"] == 32
    flagged = {prompts[r["prompt_id"]] for r in scores if r["flagged"]}
    assert summary["flagged_prompts"]["count"] == len(flagged)
    low, high = summary["flagged_prompts"]["ci95"]
    assert low <= summary["flagged_prompts"]["rate"] <= high
    dup32 = {c for c, r in demo["truth"].items() if r["group"] == "dup32"}
    heldout = {c for c, r in demo["truth"].items() if r["group"] == "heldout"}
    assert dup32 <= flagged and not (heldout & flagged)
    assert {f["prompt"] for f in summary["flagged"]} == flagged
    gallery = summary["gallery"]
    assert gallery and gallery[0]["label"] == "matching_verbatim" and gallery[0]["own"]
    assert gallery[0]["prompt"] in dup32 and gallery[0]["caption"] == gallery[0]["prompt"]
    matches = pq.read_table(run / "matches").to_pylist()
    assert summary["verified_pairs"] == sum(m["label"] != "none" for m in matches)
    stats = summary["similarity"]
    assert stats["generated_to_train"]["n"] == 32 and stats["train_to_train"]["n"] > 100
    # the thresholds detection applied: calibrated on the built-in reference, with the false-label
    # rates they imply beside every sample-level rate (docs/calibration.md)
    thresholds = summary["thresholds"]
    assert thresholds == {**json.loads((run / "thresholds.json").read_text()), "clique_min": "auto"}
    assert thresholds["source"] == "calibrated" and thresholds["calibration"]["images"] >= 600
    expected = summary["expected_false"]["retrieved_verbatim"]
    assert expected["of"] == thresholds["calibration"]["images"] and expected["rate"] <= expected["upper"] < 0.02
    assert set(summary["plots"]) == {"calibration", "similarity", "detectors"}
    for name in summary["plots"].values():
        with Image.open(run / "report" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def row_by_row_summary(run: Path) -> dict:
    """The report's numbers recomputed one Python row at a time from whole tables — how the
    report computed them before it aggregated in DuckDB (docs/architecture.md, "Reports at
    scale") — as the oracle the streaming path must equal field by field."""
    order = {"matching_verbatim": 4, "retrieved_verbatim": 3, "template_verbatim": 2, "low_information": 1}
    labels = ("matching_verbatim", "retrieved_verbatim", "template_verbatim")
    scores = pq.read_table(run / "prompt_scores").to_pylist()
    samples = pq.read_table(run / "samples", columns=["sample_id", "status"]).to_pylist()
    matches = pq.read_table(run / "matches").to_pylist()
    best: dict[str, str] = {}
    for m in matches:
        if m["status"] == "ok" and order.get(m["label"], 0) > order.get(best.get(m["sample_id"], ""), 0):
            best[m["sample_id"]] = m["label"]
    prompt_of = {m["sample_id"]: m["prompt_id"] for m in matches}
    n_ok = sum(s["status"] == "ok" for s in samples)
    chosen: dict[str, dict] = {}
    for m in matches:
        if m["status"] == "ok" and m["label"] in labels and best.get(m["sample_id"]) == m["label"]:
            current = chosen.get(m["prompt_id"])
            if current is None or order[m["label"]] > order[current["label"]] or (
                    m["label"] == current["label"] and m["tiled_l2"] < current["tiled_l2"]):
                chosen[m["prompt_id"]] = m
    gallery = sorted(chosen.values(), key=lambda m: (-order[m["label"]], m["tiled_l2"], m["sample_id"]))[:24]
    neighbors = pq.read_table(run / "neighbors").to_pylist()
    top1 = np.array([n["score"] for n in neighbors if n["rank"] == 0 and n["row"] >= 0], np.float32)
    q = np.quantile(top1, [0.5, 0.9, 0.99, 1.0])
    ranked = sorted(scores, key=lambda r: (-r["score"], r["prompt_id"]))
    return {
        "prompts": len(scores), "samples": len(samples), "samples_ok": n_ok, "samples_error": len(samples) - n_ok,
        "flagged_prompts": sum(r["flagged"] for r in scores),
        "samples_by_label": {label: sum(v == label for v in best.values()) for label in labels},
        "prompts_by_label": {label: len({prompt_of[s] for s, v in best.items() if v == label}) for label in labels},
        "samples_low_information": sum(v == "low_information" for v in best.values()),
        "verified_pairs": sum(m["label"] in labels for m in matches),
        "flagged": [r["prompt_id"] for r in ranked if r["flagged"]],
        "gallery": [m["sample_id"] for m in gallery],
        "generated_to_train": {"n": int(top1.size), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                               "max": float(q[3])},
    }


def test_the_report_aggregated_by_duckdb_equals_a_row_by_row_recomputation(
        demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from audit.report import baseline
    from audit.report.build import write_report

    run = tmp_path / "run"
    shutil.copytree(demo["run"], run)
    expected = row_by_row_summary(run)

    def found(summary: dict) -> dict:
        return {**{k: summary[k] for k in ("prompts", "samples", "samples_ok", "samples_error", "verified_pairs")},
                "flagged_prompts": summary["flagged_prompts"]["count"],
                "samples_by_label": {k: v["count"] for k, v in summary["samples_by_label"].items()},
                "prompts_by_label": {k: v["count"] for k, v in summary["prompts_by_label"].items()},
                "samples_low_information": summary["samples_low_information"]["count"],
                "flagged": [f["prompt_id"] for f in summary["flagged"]],
                "gallery": [g["sample_id"] for g in summary["gallery"]],
                "generated_to_train": summary["similarity"]["generated_to_train"]}

    write_report(run)
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert found(summary) == expected
    assert expected["samples_by_label"]["matching_verbatim"] > 0 and expected["gallery"]  # a run with copies
    # Past PLOT_POINTS samples the quantiles come from order statistics (nothing held), and past
    # table_size prompts the page lists the highest scores: the numbers stay the same.
    monkeypatch.setattr(baseline, "PLOT_POINTS", 5)
    write_report(run, table_size=3)
    large = json.loads((run / "report" / "summary.json").read_text())
    quantiles = large["similarity"].pop("generated_to_train")
    assert quantiles == pytest.approx(expected["generated_to_train"], rel=1e-12, abs=0)
    summary["similarity"].pop("generated_to_train")
    assert large == summary
    page = (run / "report" / "index.html").read_text()
    assert "Prompts (3 of 8)" in page and "The 3 highest scores; every prompt is in" in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is not installed: scripts/test.sh installs it (apt-get install chromium)")
    return found


def render(html: Path, out: Path) -> tuple[str, Image.Image]:
    """The DOM after scripts ran, and a screenshot, from headless Chromium."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--window-size=1280,2200", "--virtual-time-budget=3000",
             f"--user-data-dir={out / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    subprocess.run([*flags, f"--screenshot={out / 'shot.png'}", html.as_uri()], capture_output=True, timeout=120,
                   check=True)
    return dom.stdout, Image.open(out / "shot.png").convert("RGB")


def test_report_renders_in_chromium_with_gallery_plots_and_inert_captions(demo: dict, tmp_path: Path) -> None:
    run = demo["run"]
    main(["report", str(run)])
    dom, shot = render(run / "report" / "index.html", tmp_path)
    body = dom[dom.index("<body"):]
    assert 'data-sortable="ready"' in dom  # the report's own script ran
    assert "data-pwned" not in dom  # the hostile prompt's script and handler did not
    assert "&lt;script&gt;document.body.dataset.pwned" in body  # shown as text
    assert "<script>document.body" not in body
    gallery = body[body.index('id="gallery"'):body.index('id="plots-title"')]
    assert gallery.count('class="pair"') >= 3 and gallery.count('src="data:image/png;base64,') >= 6
    assert 'id="plot-similarity"' in body and 'id="plot-detectors"' in body and 'id="plot-calibration"' in body
    thresholds = body[body.index('id="thresholds"'):]
    assert "calibrated</b> (calibrated on" in thresholds and "false labels alone:" in body
    assert body.count("<tr") == 9  # header + one row per prompt
    pixels = np.asarray(shot)
    assert shot.size == (1280, 2200) and pixels.std() > 20  # not a blank page
    assert (np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 60).sum() > 500  # colour: plots


def test_report_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder (no run.json)" in capsys.readouterr().err


def rewrite_scores(run: Path, flips: dict[str, bool]) -> None:
    """Set ``flagged`` of some prompts in a copied run (file and marker kept consistent)."""
    store = RunStore(run)
    for path in sorted((run / "prompt_scores").glob("*.parquet")):
        table = pq.read_table(path)
        ids = table.column("prompt_id").to_pylist()
        flagged = [flips.get(p, f) for p, f in zip(ids, table.column("flagged").to_pylist())]
        table = table.set_column(table.schema.get_field_index("flagged"), "flagged", pa.array(flagged, pa.bool_()))
        pq.write_table(table, path)
        marker_path = store.marker_path("prompt_scores", path.stem)
        marker = json.loads(marker_path.read_text())
        marker.update(bytes=path.stat().st_size, sha256=file_sha256(path))
        marker_path.write_text(json.dumps(marker))


def test_compare_counts_the_prompts_each_run_scored_by_id(demo: dict, tmp_path: Path) -> None:
    """Common / only-in-A / only-in-B: by sorted 64-bit ids when every id is 16 hex digits, by a
    join otherwise; both equal set arithmetic on the ids."""
    from audit.report.compare import compare_runs

    a = demo["run"]
    b = tmp_path / "b" / a.relative_to(demo["tmp"] / "runs")
    shutil.copytree(a, b)
    store = RunStore(b)
    first, *rest = sorted((b / "prompt_scores").glob("*.parquet"))
    first.unlink()  # B lost a shard: its prompts are only in A
    store.marker_path("prompt_scores", first.stem).unlink()

    def counts() -> tuple[int, int, int]:
        result = compare_runs(a, b)
        return result["common_prompts"], result["only_in_a"], result["only_in_b"]

    ids_a = set(pq.read_table(a / "prompt_scores", columns=["prompt_id"]).column(0).to_pylist())
    ids_b = {i for f in rest for i in pq.read_table(f, columns=["prompt_id"]).column(0).to_pylist()}
    assert 0 < len(ids_b) < len(ids_a)
    assert counts() == (len(ids_a & ids_b), len(ids_a - ids_b), len(ids_b - ids_a))
    table = pq.read_table(rest[0])  # one id that is not 16 hex digits: counted by the join instead
    renamed = ["not a hex id"] + table.column("prompt_id").to_pylist()[1:]
    pq.write_table(table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", pa.array(renamed)), rest[0])
    marker = json.loads(store.marker_path("prompt_scores", rest[0].stem).read_text())
    marker.update(bytes=rest[0].stat().st_size, sha256=file_sha256(rest[0]))
    store.marker_path("prompt_scores", rest[0].stem).write_text(json.dumps(marker))
    ids_b = ids_b - {table.column("prompt_id")[0].as_py()} | {"not a hex id"}
    assert counts() == (len(ids_a & ids_b), len(ids_a - ids_b), len(ids_b - ids_a))


def test_compare_reports_exactly_the_planted_differences_and_gates(demo: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    a = demo["run"]
    b = tmp_path / "b" / a.relative_to(demo["tmp"] / "runs")
    shutil.copytree(a, b)
    scores = pq.read_table(a / "prompt_scores").to_pylist()
    was_flagged = sorted(r["prompt_id"] for r in scores if r["flagged"])
    not_flagged = sorted(r["prompt_id"] for r in scores if not r["flagged"])
    gone, new = was_flagged[0], not_flagged[0]
    rewrite_scores(b, {gone: False, new: True})
    assert main(["compare", str(a), str(b)]) == 0
    out = b / "compare" / f"vs-{a.parent.parent.name[6:]}-{a.parent.name[11:]}-{a.name[4:]}"
    result = json.loads((out / "compare.json").read_text())
    assert [r["prompt_id"] for r in result["newly_memorized"]] == [new]
    assert [r["prompt_id"] for r in result["no_longer_memorized"]] == [gone]
    assert sorted(r["prompt_id"] for r in result["still_memorized"]) == was_flagged[1:]
    assert result["rates"]["flagged_prompts"]["delta"] == 0 and result["common_prompts"] == 8
    assert result["settings_differences"] == {}
    assert (out / "index.html").is_file()
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--fail-if-new-memorized", "--out", str(tmp_path / "c")]) == 4
    assert "release gate failed: 1 prompts newly memorized" in capsys.readouterr().err
    assert main(["compare", str(b), str(a), "--fail-if-new-memorized", "--out", str(tmp_path / "c")]) == 4
    rewrite_scores(b, {gone: True})  # now B only adds a memorized prompt: the rate rises by 1/8
    assert main(["compare", str(a), str(b), "--max-rate-increase", "0.2", "--out", str(tmp_path / "d")]) == 0
    assert main(["compare", str(a), str(b), "--max-rate-increase", "0.1", "--out", str(tmp_path / "d")]) == 4
    assert main(["compare", str(a), str(a), "--fail-if-new-memorized", "--out", str(tmp_path / "e")]) == 0


def test_compare_refuses_runs_detected_with_different_thresholds(demo: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    a = demo["run"]
    b = tmp_path / "b" / a.relative_to(demo["tmp"] / "runs")
    shutil.copytree(a, b)
    recorded = json.loads((b / "thresholds.json").read_text())
    (b / "thresholds.json").write_text(json.dumps({**recorded, "source": "paper", "match_l2": 0.15,
                                                   "low_information": False}))
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "different thresholds (source: calibrated vs paper" in err and "--allow-different-calibration" in err
    assert not (tmp_path / "c").exists()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c"), "--allow-different-calibration"]) == 0
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert not result["thresholds"]["same"] and 'id="thresholds-differ"' in (tmp_path / "c" / "index.html").read_text()


def test_analyst_notebook_executes_against_a_fresh_run(demo: dict, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "analyst_queries.ipynb", as_version=4)
    os.environ["MEMAUDIT_RUNS"] = str(demo["tmp"] / "runs")
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        os.environ.pop("MEMAUDIT_RUNS")
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    dup32 = [c for c, r in demo["truth"].items() if r["group"] == "dup32"]
    assert all(caption[:40] in text for caption in dup32)  # the most memorized prompts are listed
    assert not any(o.get("output_type") == "error" for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
