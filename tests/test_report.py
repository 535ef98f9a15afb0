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
