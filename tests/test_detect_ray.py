"""The distributed kNN join and the whole detection chain on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from audit.cli import main
from audit.config import ReferenceSection
from audit.pipeline.detection import _fan_out, shard_actor_args, start_shard_actor
from audit.reference.index import build_index
from test_reference_index import unit, write_folder


def actors_for(root: Path, manifest: dict, n_actors: int, rerank: int = 20) -> tuple[list, list]:
    args = shard_actor_args(root, None, [s["shard"] for s in manifest["shards"]], n_actors, 16, rerank)
    return [start_shard_actor(a) for a in args], args


def test_join_over_exact_shards_equals_one_flat_index(ray_local: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((2000, 48)))
    root = write_folder(tmp_path / "ref", [base[:900], base[900:]])
    manifest = build_index(root, ReferenceSection(vectors_per_shard=500))  # 4 shards for 2 actors
    queries = unit(rng.standard_normal((300, 48))).astype(np.float32)
    flat = faiss.IndexFlatIP(48)
    flat.add(unit(base.astype(np.float16).astype(np.float32)).astype(np.float32))
    expected_scores, expected_rows = flat.search(queries, 10)
    actors, args = actors_for(root, manifest, n_actors=2)
    scores, rows = _fan_out(actors, args, queries, 10, max_attempts=3)
    assert np.array_equal(rows, expected_rows)
    assert np.allclose(scores, expected_scores, atol=1e-5)
    ray.kill(actors[1])  # a dead shard actor is restarted and its batch retried
    again = _fan_out(actors, args, queries, 10, max_attempts=3)
    assert np.array_equal(again[1], expected_rows)
    for actor in actors:
        ray.kill(actor)


def test_join_over_ivf_shards_keeps_recall(ray_local: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 64)) * 3
    base = unit(centres[rng.integers(0, 40, 12_000)] + rng.standard_normal((12_000, 64)))
    root = write_folder(tmp_path / "ref", [base])
    manifest = build_index(root, ReferenceSection(index_factory="IVF32,SQ8", vectors_per_shard=6000,
                                                  train_sample=3000))
    queries = unit(centres[rng.integers(0, 40, 256)] + rng.standard_normal((256, 64))).astype(np.float32)
    truth = np.argsort(-(queries @ unit(base.astype(np.float16).astype(np.float32)).T), axis=1)[:, :10]
    actors, args = actors_for(root, manifest, n_actors=2)
    _, rows = _fan_out(actors, args, queries, 10, max_attempts=3)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert recall >= 0.95, recall
    for actor in actors:
        ray.kill(actor)


@pytest.fixture(scope="module")
def testbed_run(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from audit.testbed.checkpoints import testbed_folder

    tmp = tmp_path_factory.mktemp("detect")
    assert main(["-q", "reference", "testbed", str(tmp / "ref")]) == 0
    truth = pq.read_table(testbed_folder() / "ground_truth.parquet").to_pylist()
    chosen = [r for g in ("dup32", "heldout") for r in [t for t in truth if t["group"] == g][:3]]
    (tmp / "prompts.txt").write_text("\n".join(r["caption"] for r in chosen) + "\n")
    args = ["run", "--set", f"run.root={tmp / 'runs'}", "--set", f"prompts.source={tmp / 'prompts.txt'}",
            "--set", f"reference.path={tmp / 'ref'}", "--set", "generation.prompts_per_shard=2"]
    assert main(args) == 0
    run = next((tmp / "runs").glob("*/*/*"))
    return {"run": run, "truth": {r["prompt_id"]: r for r in chosen}, "args": args, "tmp": tmp}


def test_testbed_duplicated_captions_flagged_with_their_own_image(testbed_run: dict) -> None:
    run, truth = testbed_run["run"], testbed_run["truth"]
    scores = {r["prompt_id"]: r for r in pq.read_table(run / "prompt_scores").to_pylist()}
    assert set(scores) == set(truth)
    matches = pq.read_table(run / "matches").to_pylist()
    for pid, t in truth.items():
        if t["group"] == "dup32":
            assert scores[pid]["flagged"] and scores[pid]["n_matching"] >= 2, scores[pid]
            own = [m for m in matches if m["prompt_id"] == pid and m["label"] == "matching_verbatim"]
            assert own and all(m["key"].rsplit("-", 1)[0] == t["key"] for m in own)  # its own training image
        else:
            assert not scores[pid]["flagged"] and scores[pid]["n_matching"] == 0, scores[pid]
    neighbors = pq.read_table(run / "neighbors").to_pylist()
    assert {n["rank"] for n in neighbors} == set(range(10))


def test_detection_resumes_and_refuses_another_embedding_model(testbed_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    run, tmp = testbed_run["run"], testbed_run["tmp"]
    before = {p: p.stat().st_mtime_ns for p in (run / "prompt_scores").glob("*.parquet")}
    assert main(testbed_run["args"]) == 0
    out = capsys.readouterr().out
    assert "neighbors: 0 shards joined now" in out and "detection: 0 shards scored now" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    ts = tmp / "other.pt"
    import torch

    torch.jit.script(torch.nn.Flatten()).save(str(ts))
    code = main([*testbed_run["args"], "--set", "embedding.kind=torchscript", "--set", f"embedding.model={ts}"])
    assert code == 2 and "the index was embedded with builtin:testbed-copy" in capsys.readouterr().err
    manifest = json.loads((tmp / "ref" / "index" / "manifest.json").read_text())
    assert manifest["embedding"]["model_id"] == "builtin:testbed-copy"


def test_detection_applies_the_references_calibration_and_refuses_a_stale_one(
        testbed_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """`reference testbed` calibrated the reference; the run recorded the calibrated thresholds.
    Settings the calibration was not made for are refused before any work, with the fix."""
    run, tmp = testbed_run["run"], testbed_run["tmp"]
    calibration = json.loads((tmp / "ref" / "calibration" / "calibration.json").read_text())
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert thresholds["source"] == "calibrated" and thresholds["calibration"] == calibration
    assert thresholds["match_l2"] != 0.15 and thresholds["verbatim_rate"]["of"] == calibration["images"]
    markers = sorted((run / "prompt_scores" / "_markers").glob("*.json"))
    assert all(json.loads(m.read_text())["inputs"]["thresholds"] for m in markers)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main([*testbed_run["args"], "--set", "detection.verify_top=2"]) == 2
    err = capsys.readouterr().err
    assert "detection.verify_top: calibrated 3, configured 2" in err and "reference calibrate" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_index_shard_actor_killed_mid_join_is_restarted_and_neighbors_are_identical(testbed_run: dict,
                                                                                     tmp_path: Path) -> None:
    import shutil
    import threading
    import time

    import psutil

    shutil.copytree(testbed_run["tmp"] / "runs", tmp_path / "runs")
    run = tmp_path / "runs" / testbed_run["run"].relative_to(testbed_run["tmp"] / "runs")
    shutil.rmtree(run / "neighbors")
    killed: list[int] = []

    def kill_first_index_actor() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            for proc in psutil.process_iter(["cmdline"]):
                if "ray::IndexShardActor" in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_index_actor, daemon=True)
    killer.start()
    args = [*testbed_run["args"], "--set", f"run.root={tmp_path / 'runs'}", "--set", "detection.join_batch=8"]
    assert main(args) == 0
    killer.join()
    assert killed, "no index shard actor was seen"

    def neighbors(folder: Path) -> list[dict]:  # k rows per sample, one per rank
        return sorted(pq.read_table(folder / "neighbors").to_pylist(), key=lambda r: (r["sample_id"], r["rank"]))

    again, before = neighbors(run), neighbors(testbed_run["run"])
    assert len({(r["sample_id"], r["rank"]) for r in again}) == len(again) == len(before) > 0
    assert again == before
