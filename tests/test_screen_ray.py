"""Screening on a local Ray, on the shipped testbed (docs/screening.md): the screen ranks the
heavily duplicated captions above the held-out ones, a two-stage run escalates, audits and flags
them and scores every prompt, the screen survives a killed actor byte for byte, and verify
covers it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audit.cli import main
from audit.config import load_config
from audit.store import RunStore
from helpers import kill_step_workers_mid_run

# 16 seeds: with 4 the glyph testbed's weakest 32x caption and its strongest held-out one overlap
# (docs/screening.md, "Figures"); 8 prompts per screen shard so a run has shards to kill between;
# two rounds (4, then 8 samples) for the escalated prompts the first round does not flag.
SETTINGS = ["screen.seeds=16", "screen.top=0.5", "screen.prompts_per_shard=8", "reference.path=builtin:testbed",
            "generation.max_samples_per_prompt=8"]


def _truth() -> dict[str, tuple[str, int]]:
    from audit import ids
    from audit.testbed.checkpoints import shipped_folder

    table = pq.read_table(shipped_folder("testbed") / "ground_truth.parquet").to_pylist()
    return {ids.prompt_id(r["caption"]): (r["group"], r["duplicates"]) for r in table}


@pytest.fixture(scope="module")
def screened(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from audit.pipeline import run_audit

    root = tmp_path_factory.mktemp("screened")
    cfg = load_config(None, [f"run.root={root / 'runs'}", *SETTINGS])
    result = run_audit(cfg)
    return {"run": result.run_path, "result": result, "root": root, "ray": ray_local}


def test_the_screen_ranks_every_32x_caption_above_every_heldout_caption(screened: dict) -> None:
    truth = _truth()
    table = pq.read_table(screened["run"] / "escalation" / "escalation.parquet").to_pylist()
    groups = {r["prompt_id"]: truth[r["prompt_id"]][0] for r in table}
    dup32 = [r["screen_score"] for r in table if groups[r["prompt_id"]] == "dup32"]
    heldout = [r["screen_score"] for r in table if groups[r["prompt_id"]] == "heldout"]
    assert len(dup32) == len(heldout) == 8
    assert min(dup32) > max(heldout)


def test_a_two_stage_run_escalates_audits_and_flags_them_and_scores_every_prompt(screened: dict) -> None:
    run, truth = screened["run"], _truth()
    prompts = pq.read_table(run / "prompts").column("prompt_id").to_pylist()
    scores = {r["prompt_id"]: r for r in pq.read_table(run / "prompt_scores").to_pylist()}
    assert sorted(scores) == sorted(prompts) and len(prompts) == 40  # a row for every screened prompt
    escalated = {p for p, r in scores.items() if r["escalated"]}
    rounds = {r["prompt_id"]: r for r in pq.read_table(run / "rounds" / "round-0.parquet").to_pylist()}
    assert len(escalated) == 20 and screened["result"].escalation["escalated"] == 20  # screen.top: 0.5
    dup32 = {p for p in prompts if truth[p][0] == "dup32"}
    assert dup32 <= escalated
    assert all(scores[p]["flagged"] for p in dup32)
    for p, row in scores.items():
        assert row["screen_score"] is not None and row["escalated"] == (p in escalated)
        if p not in escalated:
            assert row["n_samples"] == 0 and not row["flagged"] and row["escalation"] is None
        else:  # flagged after the first round: 4 samples; the others get the second round
            first = rounds[p]
            assert "top" in row["escalation"] and first["n_samples"] == 4
            assert row["n_samples"] == (4 if first["decision"] == "memorized" else 8)
    assert set(rounds) == escalated
    # nothing is clean after 4 samples (clean_after_samples 16): each is flagged or goes on
    assert {r["decision"] for r in rounds.values()} == {"memorized", "continue"}
    sampled = set(pq.read_table(run / "samples", columns=["prompt_id"]).column(0).to_pylist())
    assert sampled == escalated  # no generation for prompts the screen decided


def test_the_screens_first_step_magnitude_is_the_one_generation_records(screened: dict) -> None:
    run = screened["run"]
    screen = {r["prompt_id"]: r["noise_magnitude_seeds"] for r in pq.read_table(run / "screen").to_pylist()}
    samples = pq.read_table(run / "samples", columns=["prompt_id", "sample_idx", "noise_magnitude"]).to_pylist()
    assert samples
    for row in samples:
        assert screen[row["prompt_id"]][row["sample_idx"]] == pytest.approx(row["noise_magnitude"], rel=1e-4)


def test_rerunning_screens_and_generates_nothing_and_verify_covers_the_screen(
        screened: dict, capsys: pytest.CaptureFixture[str]) -> None:
    run = screened["run"]
    config = ["--set", f"run.root={screened['root'] / 'runs'}"] + [a for s in SETTINGS for a in ("--set", s)]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet") if "report" not in p.parts}
    assert main(["-q", "run", *config, "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "screen: 0 shards screened now, 5 of 5 already complete" in out and "samples: 0 written" in out
    assert "detection: 0 shards scored now" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert main(["verify", str(run)]) == 0
    capsys.readouterr()
    damaged = screened["root"] / "damaged"
    subprocess.run(["cp", "-r", str(run), str(damaged)], check=True)
    shard = damaged / "screen" / "shard-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    (damaged / "screen" / "_markers" / "shard-00004.json").unlink()
    assert main(["verify", str(damaged)]) == 5
    out = capsys.readouterr().out
    assert "screen/shard-00002: sha256 differs" in out and "2 of 5 screen shards not complete" in out  # the damaged one and the unmarked one


def test_most_duplicated_captions_are_screened_most_duplicated_first(screened: dict) -> None:
    from audit.pipeline import run_screen
    from audit.reference.locate import builtin_reference_folder

    reference = builtin_reference_folder("builtin:testbed")  # built by the module's run
    cfg = load_config(None, [f"run.root={screened['root'] / 'dups'}", f"prompts.source={reference}",
                             "prompts.format=most_duplicated", "prompts.limit=24", "screen.seeds=4",
                             "screen.top=8", "screen.steps=3"])
    result = run_screen(cfg)
    assert result.escalation is not None and result.escalation["escalated"] == 8
    table = pq.read_table(result.run_path / "escalation" / "escalation.parquet").to_pylist()
    # screen.steps 3: Huang et al.'s latent updates over 3 sampler steps join the score as a third z
    for row in table:
        assert row["latent_update"] > 0
        assert row["screen_score"] == pytest.approx(
            (row["z_noise_magnitude"] + row["z_alignment"] + row["z_latent_update"]) / 3, abs=1e-5)
    screen = pq.read_table(result.run_path / "screen").to_pylist()
    assert all(len(r["latent_update_seeds"]) == 4 for r in screen)
    truth = _truth()
    duplicates = [truth[r["prompt_id"]][1] for r in table]
    assert duplicates == sorted(duplicates, reverse=True)  # the plan's order: most duplicated first
    assert not (result.run_path / "samples").exists()  # `memaudit screen` generates nothing


@pytest.mark.slow
def test_a_screening_actor_killed_mid_run_is_replaced_and_the_screen_is_byte_identical(
        screened: dict, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    args = ["--set", f"run.root={root}"] + [a for s in SETTINGS for a in ("--set", s)]
    # SIGKILL the screening workers while they screen the next shards
    markers, workers, code, output = kill_step_workers_mid_run(["screen", *args, "--address", screened["ray"]],
                                                               root, "screen")
    assert markers and workers, output
    assert code == 0, output
    assert "retrying" in output, output
    run = markers[0].parents[2]
    mine, theirs = RunStore(run), RunStore(screened["run"])
    for i in range(5):
        name = f"shard-{i:05d}"
        assert mine.shard_path("screen", name).read_bytes() == theirs.shard_path("screen", name).read_bytes()
    assert (run / "escalation" / "escalation.parquet").read_bytes() == \
        (screened["run"] / "escalation" / "escalation.parquet").read_bytes()


@pytest.fixture(scope="module")
def adaptive(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An adaptive run (no screen) on 3 captions each duplicated 32x and 8x and 3 held out:
    rounds of 4, 8 and 12 samples, clean after 8 evidence-free samples."""
    from audit.pipeline import run_audit
    from audit.testbed.checkpoints import shipped_folder

    root = tmp_path_factory.mktemp("adaptive")
    table = pq.read_table(shipped_folder("testbed") / "ground_truth.parquet").to_pylist()
    captions = [r["caption"] for g in ("dup32", "dup8", "heldout") for r in [t for t in table if t["group"] == g][:3]]
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    settings = [f"run.root={root / 'runs'}", f"prompts.source={root / 'prompts.txt'}", "reference.path=builtin:testbed",
                "generation.max_samples_per_prompt=12", "generation.clean_after_samples=8"]
    result = run_audit(load_config(None, settings))
    return {"run": result.run_path, "settings": settings, "result": result}


@pytest.mark.slow
def test_adaptive_rounds_stop_each_prompt_when_it_is_decided(adaptive: dict) -> None:
    from audit.detect.rounds import decide

    run = adaptive["run"]
    scores = {r["prompt_id"]: r for r in pq.read_table(run / "prompt_scores").to_pylist()}
    rounds = [{r["prompt_id"]: r for r in pq.read_table(run / "rounds" / f"round-{k}.parquet").to_pylist()}
              for k in range(2)]
    assert not (run / "rounds" / "round-2.parquet").exists()  # the last round decides nothing further
    ends, kinds = [4, 8, 12], set()
    for pid, row in scores.items():
        if rounds[0][pid]["decision"] == "memorized":
            kind, expected = "memorized", 4  # stops after the first round
        elif rounds[1][pid]["decision"] == "clean":
            kind, expected = "clean", 8  # no evidence in 8 samples
        else:
            kind, expected = "ambiguous", 12  # evidence, never conclusive: runs to the maximum
        kinds.add(kind)
        assert row["n_samples"] == expected, (pid, kind, row)
        for k, decided in enumerate(rounds):  # every recorded decision follows the documented rule
            if pid in decided:
                assert decided[pid]["n_samples"] == ends[k]
        if kind == "memorized":
            assert row["flagged"] and decide(row, 8)[0] == "memorized"
    assert kinds == {"memorized", "clean", "ambiguous"}
    samples = pq.read_table(run / "samples", columns=["sample_id"]).column(0).to_pylist()
    assert len(samples) == len(set(samples)) == sum(r["n_samples"] for r in scores.values())


@pytest.mark.slow
def test_rerunning_a_finished_adaptive_run_regenerates_nothing(adaptive: dict, capsys: pytest.CaptureFixture[str]) -> None:
    run = adaptive["run"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet") if "report" not in p.parts}
    assert main(["-q", "run", *[a for s in adaptive["settings"] for a in ("--set", s)], "--no-report"]) == 0
    assert "samples: 0 written" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert main(["verify", str(run)]) == 0
