"""The shipped LoRA testbed audited end to end on a local Ray: builtin:testbed + builtin:testbed-lora
against the reference of everything the adapted model was trained on. The adapter's duplicated
fine-tuning captions are flagged with their own image, the base alone flags none of them, the
adapter is another checkpoint, `compare` reports what it newly memorized and its gate fails
(exit 4), and resume and `verify` hold."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audit.cli import main

# ~80 s (a reference of 1,528 images, two audits on Ray): run by hand (--run-slow) before a release;
# the default suite checks the adapter's identity, loading and refusals (tests/test_lora.py).
pytestmark = pytest.mark.slow

ADAPTER = '[{"path": "builtin:testbed-lora", "scale": 1.0}]'


@pytest.fixture(scope="module")
def audits(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from audit.testbed.checkpoints import lora_testbed_folder

    tmp = tmp_path_factory.mktemp("lora-audit")
    assert main(["-q", "reference", "testbed", str(tmp / "ref"), "--testbed", "lora"]) == 0
    truth = pq.read_table(lora_testbed_folder() / "ground_truth.parquet").to_pylist()
    most = max(t["duplicates"] for t in truth)
    chosen = [t for t in truth if t["duplicates"] == most][:3] + [t for t in truth if t["duplicates"] == 0][:3]
    (tmp / "prompts.txt").write_text("\n".join(t["caption"] for t in chosen) + "\n")
    base = ["run", "--no-report", "--set", f"run.root={tmp / 'runs'}", "--set", f"prompts.source={tmp / 'prompts.txt'}",
            "--set", f"reference.path={tmp / 'ref'}", "--set", "generation.prompts_per_shard=2"]
    adapted = [*base, "--set", f"model.lora={ADAPTER}"]
    assert main(base) == 0
    assert main(adapted) == 0
    runs = {json.loads((r / "run.json").read_text())["family"]["adapters"] == []: r
            for r in (tmp / "runs").glob("model=*/checkpoint=*/run=*")}
    return {"base": runs[True], "adapted": runs[False], "truth": {t["prompt_id"]: t for t in chosen}, "most": most,
            "args": adapted, "tmp": tmp}


def _scores(run: Path) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in pq.read_table(run / "prompt_scores").to_pylist()}


def test_the_adapter_is_another_checkpoint_of_the_same_base(audits: dict) -> None:
    base, adapted = audits["base"], audits["adapted"]
    assert base.parent != adapted.parent  # checkpoint=<id> differs
    record = json.loads((adapted / "run.json").read_text())
    assert record["pipeline"]["base_content_sha256"] == json.loads((base / "run.json").read_text())["pipeline"][
        "content_sha256"]
    assert record["family"]["adapters"][0]["path"] == "builtin:testbed-lora"


def test_the_adapters_duplicated_captions_are_flagged_with_their_own_image_and_the_base_flags_none(
        audits: dict) -> None:
    truth = audits["truth"]
    adapted, base = _scores(audits["adapted"]), _scores(audits["base"])
    matches = pq.read_table(audits["adapted"] / "matches").to_pylist()
    for pid, t in truth.items():
        assert not base[pid]["flagged"], base[pid]
        if t["duplicates"] == audits["most"]:
            assert adapted[pid]["flagged"], adapted[pid]
            own = [m for m in matches if m["prompt_id"] == pid and m["label"] == "matching_verbatim"]
            assert own and all(m["key"].rsplit("-", 1)[0] == t["key"] for m in own)
        else:
            assert not adapted[pid]["flagged"], adapted[pid]


def test_compare_reports_what_the_adapter_memorized_and_its_gate_fails(audits: dict,
                                                                       capsys: pytest.CaptureFixture) -> None:
    code = main(["compare", str(audits["base"]), str(audits["adapted"]), "--fail-if-new-memorized"])
    assert code == 4
    compare = json.loads(next(audits["adapted"].glob("compare/*/compare.json")).read_text())
    duplicated = {pid for pid, t in audits["truth"].items() if t["duplicates"] == audits["most"]}
    assert {row["prompt_id"] for row in compare["newly_memorized"]} == duplicated


def test_the_adapted_run_resumes_without_work_and_verifies(audits: dict, capsys: pytest.CaptureFixture) -> None:
    run = audits["adapted"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
    capsys.readouterr()
    assert main(audits["args"]) == 0
    out = capsys.readouterr().out
    assert "samples: 0 written this time (0 shards)" in out and "detection: 0 shards scored now" in out, out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert main(["verify", str(run)]) == 0
