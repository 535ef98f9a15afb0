"""The screen in the report and in compare (docs/screening.md): a screened audit of the testbed
beside an unscreened one of the same prompts; every number checked against the run's own tables."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.stats import binomtest

from audit.cli import main
from test_report import chromium

N_PROMPTS = 24
COMMON = ["generation.steps=10", "reference.path=builtin:testbed", f"prompts.limit={N_PROMPTS}"]


@pytest.fixture(scope="module")
def runs(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One screened run (half the prompts escalated) and one unscreened run of the same prompts,
    each with its report."""
    from audit.config import load_config
    from audit.pipeline import run_audit
    from audit.report.build import write_report

    tmp = tmp_path_factory.mktemp("report-screen")
    screened = run_audit(load_config(None, [f"run.root={tmp / 'screened'}", "screen.top=0.5", *COMMON])).run_path
    plain = run_audit(load_config(None, [f"run.root={tmp / 'plain'}", *COMMON])).run_path
    for run in (screened, plain):
        write_report(run)
    return {"screened": screened, "plain": plain, "tmp": tmp}


def tables(run: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """escalation.parquet's rows and prompt_scores/ by prompt id."""
    escalation = pq.read_table(run / "escalation" / "escalation.parquet").to_pylist()
    scores = {r["prompt_id"]: r for r in pq.read_table(run / "prompt_scores").to_pylist()}
    return escalation, scores


def expected_funnel(run: Path) -> dict[str, tuple[int, int]]:
    """(count, of) of each funnel stage, counted here from the tables."""
    escalation, scores = tables(run)
    escalated = [r["prompt_id"] for r in escalation if r["escalated"]]
    return {"screened": (len(escalation), N_PROMPTS), "escalated": (len(escalated), len(escalation)),
            "flagged": (sum(bool(scores[p]["flagged"]) for p in escalated), len(escalated))}


def assert_rate(r: dict[str, Any], count: int, of: int) -> None:
    assert (r["count"], r["of"]) == (count, of)
    assert r["rate"] == pytest.approx(count / of if of else 0.0)
    interval = binomtest(count, of).proportion_ci(0.95, method="wilson")
    assert r["ci95"] == pytest.approx([interval.low, interval.high], abs=1e-9)


def table_of(page: str, table_id: str) -> str:
    start = page.index(f'<table id="{table_id}"')
    return page[start:page.index("</table>", start)]


def table_rows(table: str) -> list[dict[str, str]]:
    """A sortable table's rows: heading -> the cell's sort value (data-value)."""
    headings = [html.unescape(h) for h in re.findall(r'<th data-type="[a-z]+">([^<]*)</th>', table)]
    return [dict(zip(headings, (html.unescape(v) for v in re.findall(r'<td[^>]*data-value="([^"]*)"', row))))
            for row in table.split("<tr")[2:]]


def test_report_funnel_matches_the_escalation_file_and_prompt_scores(runs: dict[str, Path]) -> None:
    run = runs["screened"]
    summary = json.loads((run / "report" / "summary.json").read_text())
    screen = summary["screen"]
    escalation, scores = tables(run)
    assert len(escalation) == N_PROMPTS and set(scores) == {r["prompt_id"] for r in escalation}
    for stage, (count, of) in expected_funnel(run).items():
        assert_rate(screen[stage], count, of)
    assert screen["escalated"]["count"] == N_PROMPTS // 2  # screen.top: 0.5
    # a prompt the screen decided has no samples and is never flagged
    decided = [scores[r["prompt_id"]] for r in escalation if not r["escalated"]]
    assert decided and all(s["n_samples"] == 0 and not s["flagged"] and s["p_value"] == 1.0 for s in decided)
    assert screen["by_reason"] == dict(Counter(r["escalation"] for r in escalation if r["escalated"]))
    assert screen["settings"] == json.loads((run / "run.json").read_text())["config"]["screen"]
    assert screen["top_count"] == N_PROMPTS // 2
    assert summary["prompts"] == N_PROMPTS


def test_report_lists_every_screened_prompt_with_its_screen_columns(runs: dict[str, Path]) -> None:
    run = runs["screened"]
    page = (run / "report" / "index.html").read_text()
    escalation, scores = tables(run)
    rows = {r["prompt id"]: r for r in table_rows(table_of(page, "prompts"))}
    assert len(rows) == N_PROMPTS and set(rows) == {r["prompt_id"] for r in escalation}
    for r in escalation:  # each prompt's row carries its screen signals and decision
        row = rows[r["prompt_id"]]
        assert float(row["screen score"]) == pytest.approx(r["screen_score"])
        assert float(row["screen noise magnitude"]) == pytest.approx(r["noise_magnitude"])
        assert float(row["screen alignment"]) == pytest.approx(r["alignment"])
        assert row["escalated"] == str(int(r["escalated"])) and row["escalated because"] == (r["escalation"] or "")
        assert int(row["samples"]) == scores[r["prompt_id"]]["n_samples"] == (4 if r["escalated"] else 0)
    assert 'id="screen-title"' in page and 'id="funnel"' in page and 'id="plot-screen"' in page


def test_report_plots_the_screen_scores(runs: dict[str, Path]) -> None:
    run = runs["screened"]
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["plots"]["screen"] == "screen.png"
    with Image.open(run / "report" / "screen.png") as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_a_run_without_a_screen_reports_no_screen(runs: dict[str, Path]) -> None:
    report = runs["plain"] / "report"
    summary = json.loads((report / "summary.json").read_text())
    page = (report / "index.html").read_text()
    assert "screen" not in summary and "screen" not in summary["plots"] and not (report / "screen.png").exists()
    assert 'id="screen-title"' not in page and 'id="plot-screen"' not in page and ">screen score</th>" not in page
    assert len(table_rows(table_of(page, "prompts"))) == N_PROMPTS


def test_report_of_a_screened_run_that_escalated_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    """No samples shard at all (nothing escalated) is no error for a screened run."""
    run = tmp_path / "run"
    shutil.copytree(runs["screened"], run)
    for table in ("samples", "embeddings", "neighbors", "matches", "report"):
        shutil.rmtree(run / table)
    assert main(["report", str(run)]) == 0
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["samples"] == 0 and summary["screen"]["screened"]["count"] == N_PROMPTS


def compare(a: Path, b: Path, out: Path) -> tuple[dict[str, Any], str]:
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    return json.loads((out / "compare.json").read_text()), (out / "index.html").read_text()


def test_compare_a_screened_run_with_an_unscreened_one(runs: dict[str, Path], tmp_path: Path) -> None:
    screened, plain = runs["screened"], runs["plain"]
    escalation, _ = tables(screened)
    scores = {r["prompt_id"]: r["screen_score"] for r in escalation}
    expected = expected_funnel(screened)
    for a, b, side, other in ((plain, screened, "b", "a"), (screened, plain, "a", "b")):
        result, page = compare(a, b, tmp_path / f"{side}")
        assert result["common_prompts"] == N_PROMPTS and result["only_in_a"] == result["only_in_b"] == 0
        assert result["screen"][other] is None
        for stage, (count, of) in expected.items():
            assert_rate(result["screen"][side][stage], count, of)
        rows = result["screen"]["prompts"]
        assert {r["prompt_id"]: r[f"screen_score_{side}"] for r in rows} == scores
        assert all(r[f"screen_score_{other}"] is None and r[f"escalated_{other}"] is None for r in rows)
        assert result["settings_differences"]["screen"][0 if side == "a" else 1]["top"] == 0.5
        funnel = page[page.index('id="screen-funnel"'):page.index("</table>", page.index('id="screen-funnel"'))]
        count, of = expected["escalated"]
        assert funnel.count("not screened") == 3 and f"{count}/{of} = " in funnel
        listed = table_rows(table_of(page, "screen-scores"))
        assert len(listed) == N_PROMPTS and all(r[f"screen score {other.upper()}"] == "" for r in listed)


def test_compare_two_screened_runs_and_two_unscreened_ones(runs: dict[str, Path], tmp_path: Path) -> None:
    screened, plain = runs["screened"], runs["plain"]
    result, page = compare(screened, screened, tmp_path / "both")
    assert result["screen"]["a"] == result["screen"]["b"] and "not screened" not in page
    assert all(r["screen_score_delta"] == 0 for r in result["screen"]["prompts"])
    result, page = compare(plain, plain, tmp_path / "neither")
    assert "screen" not in result and 'id="screen-funnel"' not in page and "screen" not in result["settings_differences"]


def laid_out(page: Path, out: Path, ids: list[str]) -> dict[str, Any]:
    """How headless Chromium lays out some elements of ``page``: a probe page frames it (the
    report's Content Security Policy lets no other script run inside it) and reads each element's
    box, computed visibility, rendered text and, for an image, its decoded width."""
    probe = out / "probe.html"
    probe.write_text(f"""<!DOCTYPE html><html><body>
<iframe id="page" src="{page.as_uri()}" style="width:1280px;height:2200px"></iframe><pre id="result"></pre>
<script>
document.getElementById("page").addEventListener("load", function () {{
  var doc = this.contentDocument, found = {{}};
  {json.dumps(ids)}.forEach(function (id) {{
    var el = doc.getElementById(id);
    if (!el) {{ found[id] = null; return; }}
    var box = el.getBoundingClientRect(), style = doc.defaultView.getComputedStyle(el);
    found[id] = {{width: box.width, height: box.height, display: style.display, visibility: style.visibility,
                 text: el.innerText, natural_width: el.naturalWidth || 0}};
  }});
  document.getElementById("result").textContent = JSON.stringify(found);
}});
</script></body></html>""")
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--allow-file-access-from-files", "--virtual-time-budget=3000",
                          f"--user-data-dir={out / 'profile'}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the probe page did not read the report (file access refused?)"
    return json.loads(html.unescape(found.group(1)))


def test_funnel_is_visible_in_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    found = laid_out(runs["screened"] / "report" / "index.html", tmp_path,
                     ["funnel", "funnel-screened", "funnel-escalated", "funnel-flagged", "plot-screen"])
    expected = expected_funnel(runs["screened"])
    for stage, (count, of) in expected.items():
        card = found[f"funnel-{stage}"]
        assert card["width"] > 50 and card["height"] > 20 and card["visibility"] == "visible"
        assert f"{count} / {of}" in card["text"] and "95% CI" in card["text"]
    assert found["funnel"]["display"] == "flex" and found["funnel"]["height"] > 20
    assert found["plot-screen"]["natural_width"] > 300 and found["plot-screen"]["height"] > 100
