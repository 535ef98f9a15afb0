"""`memaudit run` end to end on a local Ray: layout, DuckDB, resume, regeneration, retry, crashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.cli import main
from audit.store import RunStore
from helpers import (
    PROMPTS,
    fill,
    kill_step_workers_mid_run,
    payload,
    read_only_view,
    small_disk,
    wait_for_marker,
    write_config,
)

SHARDS = ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]


def _config(folder: Path, checkpoint: Path, prompts: Path, root: Path, n_prompts: int = 8) -> Path:
    prompts.write_text("\n".join(PROMPTS[:n_prompts]) + "\n", encoding="utf-8")
    return write_config(
        folder / "audit.yaml",
        run={"root": str(root), "seed": 0},
        model={"path": str(checkpoint)},
        prompts={"source": str(prompts)},
        generation={"samples_per_prompt": 4, "steps": 6, "prompts_per_shard": 2},
        compute={"batch_size": 8},
    )


def _run_path(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("run: "))
    return Path(line.removeprefix("run: "))


def _state(run: Path) -> dict[str, tuple[int, float, str]]:
    """(inode, mtime, sha256) of every shard file and marker."""
    files = sorted((run / "samples").glob("*.parquet")) + sorted((run / "samples" / "_markers").glob("*.json"))
    return {p.name: (p.stat().st_ino, p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def _planned_ids(run: Path) -> set[str]:
    prompts = pq.read_table(run / "prompts" / "prompts.parquet").column("prompt_id").to_pylist()
    return {f"{p}-{i:05d}" for p in prompts for i in range(4)}


def _sample_ids(run: Path) -> list[str]:
    return pq.read_table(run / "samples", columns=["sample_id"]).column("sample_id").to_pylist()


@pytest.fixture(scope="module")
def first_run(ray_local: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("first")
    cfg = _config(folder, tiny_checkpoint, folder / "prompts.txt", folder / "runs")
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", str(cfg)])
    run = _run_path(out.getvalue())
    return {"code": code, "stdout": out.getvalue(), "run": run, "cfg": cfg, "state": _state(run), "ray": ray_local}


def test_local_ray_listens_on_loopback(ray_local: str) -> None:
    assert ray_local.startswith("127.0.0.1:")


def test_run_writes_layout_readable_by_duckdb(first_run: dict) -> None:
    run: Path = first_run["run"]
    assert first_run["code"] == 0, first_run["stdout"]
    assert run.parent.name.startswith("checkpoint=") and run.parent.parent.name.startswith("model=")
    info = duckdb.sql(f"select run_id, pipeline.content_sha256 as sha, prompts.n_samples as n, "
                      f"environment.packages.diffusers as diffusers, config.generation.steps as steps "
                      f"from read_json_auto('{run}/run.json')").fetchall()[0]
    assert info[0] == run.name.removeprefix("run=") and len(info[1]) == 64 and info[2] == 32 and info[4] == 6
    assert info[3]
    rows = duckdb.sql(f"select count(*), count(distinct sample_id), min(status), max(status), "
                      f"min(octet_length(image_png)), min(width), bool_and(noise_magnitude > 0) "
                      f"from read_parquet('{run}/samples/*.parquet')").fetchall()[0]
    assert rows == (32, 32, "ok", "ok", rows[4], 32, True) and rows[4] > 100
    hive = duckdb.sql(f"select distinct model, checkpoint, run from read_parquet('{run.parents[2]}/**/samples/*.parquet', "
                      "hive_partitioning=true)").fetchall()
    assert hive == [(run.parents[1].name[6:], run.parent.name[11:], run.name[4:])]
    joined = duckdb.sql(f"select count(*) from read_parquet('{run}/samples/*.parquet') s "
                        f"join read_parquet('{run}/prompts/*.parquet') p using (prompt_id)").fetchall()[0]
    assert joined == (32,)


def test_every_planned_sample_exactly_once(first_run: dict) -> None:
    ids = _sample_ids(first_run["run"])
    assert len(ids) == len(set(ids)) == 32
    assert set(ids) == _planned_ids(first_run["run"])
    assert sorted(p.stem for p in (first_run["run"] / "samples").glob("*.parquet")) == SHARDS


def test_rerun_resumes_without_regenerating(first_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(first_run["cfg"])]) == 0
    out = capsys.readouterr().out
    assert _run_path(out) == first_run["run"]
    assert "0 written this time (0 shards), 4 of 4 shards already complete" in out
    assert "embeddings: 0 shards embedded now, 4 already current" in out
    assert _state(first_run["run"]) == first_run["state"]


def test_samples_are_embedded_in_an_aligned_table(first_run: dict) -> None:
    from audit.config import EmbeddingSection
    from audit.embed.samples import TABLE
    from audit.embed.embedding import EmbedStage
    from audit.embed.storage import decode_embeddings

    run: Path = first_run["run"]
    assert "embeddings: 4 shards embedded now (4 while generating), 0 already current" in first_run["stdout"]
    for shard in SHARDS:
        samples = pq.read_table(run / "samples" / f"{shard}.parquet", columns=["sample_id", "image_png"])
        table = pq.read_table(run / TABLE / f"{shard}.parquet")
        assert table.column("sample_id").to_pylist() == samples.column("sample_id").to_pylist()
        assert table.schema.metadata[b"model_id"] == b"builtin:testbed-copy"
        assert RunStore(run).read_marker(TABLE, shard)["model_id"] == "builtin:testbed-copy"
    stage = EmbedStage(EmbeddingSection(device="cpu"))
    direct = stage({"image": np.array(samples.column("image_png").to_pylist(), dtype=object)})["embedding"]
    assert np.array_equal(decode_embeddings(table.column("embedding"), 768), direct)
    joined = duckdb.sql(f"select count(*), count(distinct e.sample_id), min(octet_length(e.embedding)) "
                        f"from read_parquet('{run}/samples/*.parquet') s "
                        f"join read_parquet('{run}/embeddings/*.parquet') e using (sample_id)").fetchall()[0]
    assert joined == (32, 32, 2 * 768)


def test_deleted_shard_is_regenerated_byte_identical(first_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = _copy_of_first_run(first_run, tmp_path)
    before = _state(run)
    (run / "samples" / "shard-00002.parquet").unlink()
    assert main(["run", str(cfg)]) == 0
    assert "written this time (1 shards), 3 of 4 shards already complete" in capsys.readouterr().out
    after = _state(run)
    for name in before:
        if "shard-00002" not in name:
            assert after[name] == before[name], f"{name} was rewritten"
    assert after["shard-00002.parquet"][2] == before["shard-00002.parquet"][2]  # byte-identical
    assert after["shard-00002.parquet"][:2] != before["shard-00002.parquet"][:2]  # but rewritten
    marker = json.loads((run / "samples" / "_markers" / "shard-00002.json").read_text())
    assert marker["sha256"] == before["shard-00002.parquet"][2]


@pytest.mark.slow
def test_retry_failed_regenerates_only_failed_rows(first_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = _copy_of_first_run(first_run, tmp_path)
    store = RunStore(run)
    original = pq.read_table(store.shard_path("samples", "shard-00001"))
    # Record two failed rows the way a failing batch does (status error, no image).
    failed = original.to_pydict()
    for i in (1, 5):
        failed["status"][i], failed["error"][i], failed["image_png"][i] = "error", "RuntimeError: CUDA error", None
    with store.open_shard("samples", "shard-00001", original.schema) as writer:
        writer.write(pa.Table.from_pydict(failed, schema=original.schema))
        writer.commit()
    untouched = _state(run)
    assert main(["run", str(cfg)]) == 3
    captured = capsys.readouterr()
    assert "2 samples failed (" not in captured.out and "re-run with --retry-failed" in captured.err
    assert main(["run", str(cfg), "--retry-failed"]) == 0
    out = capsys.readouterr().out
    assert "status: 32 ok, 0 error" in out
    repaired = pq.read_table(store.shard_path("samples", "shard-00001"))
    assert repaired.column("sample_id").to_pylist() == original.column("sample_id").to_pylist()
    assert repaired.column("image_png").to_pylist() == original.column("image_png").to_pylist()
    assert store.read_marker("samples", "shard-00001")["retried"] == 2
    # the rewritten shard is re-embedded by the separate step, from its PNGs: the same bits the
    # generation worker wrote for it in the first run
    assert "embeddings: 1 shards embedded now, 3 already current" in out
    first = RunStore(first_run["run"])
    assert first.read_marker("embeddings", "shard-00001")["during"] == "generation"
    assert store.read_marker("embeddings", "shard-00001").get("during") is None
    assert pq.read_table(store.shard_path("embeddings", "shard-00001")).equals(
        pq.read_table(first.shard_path("embeddings", "shard-00001")))
    after = _state(run)
    assert all(after[n] == untouched[n] for n in after if "shard-00001" not in n)


@pytest.mark.slow
def test_generation_actor_killed_mid_run_is_replaced_and_the_result_is_identical(
        first_run: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, tiny_checkpoint, tmp_path / "prompts.txt", tmp_path / "runs")
    # SIGKILL the generation workers while they generate the next shards
    markers, workers, code, output = kill_step_workers_mid_run(["run", str(cfg), "--address", first_run["ray"]],
                                                               tmp_path / "runs", "samples")
    assert markers and workers, output
    assert code == 0, output
    assert "retrying" in output, output  # the pool saw the actor die and gave its shard to a new one
    run = markers[0].parents[2]
    assert payload(run) == payload(first_run["run"])  # 0 lost, 0 duplicated, byte-identical
    assert main(["verify", str(run)]) == 0


@pytest.mark.slow
def test_killed_run_keeps_finished_shards_and_resumes(ray_local: str, tiny_checkpoint: Path, tmp_path: Path,
                                                      first_run: dict) -> None:
    cfg = _config(tmp_path, tiny_checkpoint, tmp_path / "prompts.txt", tmp_path / "runs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "audit.cli", "-q", "run", str(cfg), "--address", ray_local],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    markers = wait_for_marker(tmp_path / "runs", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    assert markers, f"no shard finished before the deadline:\n{output}"
    run = markers[0].parents[2]
    store = RunStore(run)
    complete = [s for s in SHARDS if store.is_complete("samples", s)]
    assert complete and len(complete) < len(SHARDS), "kill the run between its first and last shard"
    for shard in SHARDS:  # whatever was published is whole; nothing partial carries a marker
        if store.read_marker("samples", shard) is not None:
            assert store.is_complete("samples", shard)
            assert pq.read_table(store.shard_path("samples", shard)).num_rows == 8
    finished = _state(run)
    assert main(["run", str(cfg)]) == 0
    ids = _sample_ids(run)
    assert len(ids) == len(set(ids)) == 32 and set(ids) == _planned_ids(run)
    after = _state(run)
    for name in finished:
        if name.removesuffix(".parquet").removesuffix(".json") in complete:
            assert after[name] == finished[name], f"{name} was regenerated"
    assert payload(run) == payload(first_run["run"])  # byte-identical to the uninterrupted run
    assert main(["verify", str(run)]) == 0


def _copy_of_first_run(first_run: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the first run under another root, and a config pointing at it (same run id:
    the root is not part of a run's identity)."""
    root = tmp_path / "runs"
    shutil.copytree(first_run["run"].parents[2], root)
    cfg = write_config(tmp_path / "audit.yaml", **{**_load(first_run["cfg"]), "run": {"root": str(root), "seed": 0}})
    return cfg, root / first_run["run"].relative_to(first_run["run"].parents[2])


def _load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_reopening_a_run_with_other_settings_is_refused(first_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _load(first_run["cfg"])
    cfg["run"]["run_id"] = first_run["run"].name.removeprefix("run=")
    cfg["generation"]["steps"] = 7
    assert main(["run", str(write_config(tmp_path / "audit.yaml", **cfg))]) == 2
    err = capsys.readouterr().err
    assert "this run was made with other settings (generation.steps: 6 -> 7)" in err
    assert _state(first_run["run"]) == first_run["state"]


@pytest.mark.slow  # ~25 s
def test_force_sets_a_run_made_with_other_settings_aside_and_starts_again(first_run: dict, tmp_path: Path) -> None:
    cfg_path, run = _copy_of_first_run(first_run, tmp_path)
    cfg = _load(cfg_path)
    cfg["run"]["run_id"] = run.name.removeprefix("run=")
    cfg["generation"]["steps"] = 7
    other = write_config(tmp_path / "other.yaml", **cfg)
    assert main(["run", str(other)]) == 2
    assert main(["run", str(other), "--force"]) == 0
    aside = [p for p in run.parent.iterdir() if p.name.startswith(f"{run.name}.superseded-")]
    hashes = {name: state[2] for name, state in first_run["state"].items()}
    assert len(aside) == 1 and {n: st[2] for n, st in _state(aside[0]).items()} == hashes  # the old run, kept whole
    info = json.loads((run / "run.json").read_text())
    assert info["identity"]["generation"]["steps"] == 7 and len(_sample_ids(run)) == 32


def test_verify_passes_a_complete_run_and_names_each_kind_of_damage(first_run: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(first_run["run"])]) == 0
    assert "verify: 32 of 32 planned samples present in 4 of 4 complete shards; OK" in capsys.readouterr().out

    def damaged(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(first_run["run"], copy)
        return copy

    def problems(run: Path, notes: bool = False) -> list[str]:
        capsys.readouterr()
        code = main(["verify", str(run), "--json"])
        found = json.loads(capsys.readouterr().out)
        assert code == (0 if found["ok"] else 5)
        return found["problems"] + ([f"note: {n}" for n in found["notes"]] if notes else [])

    run = damaged("missing-file")
    (run / "samples" / "shard-00001.parquet").unlink()
    assert problems(run) == ["samples/shard-00001: marker says complete but the file is missing"]

    run = damaged("flipped-byte")
    path = run / "samples" / "shard-00002.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert problems(run) == ["samples/shard-00002: sha256 differs from its marker (the file changed after it was written)"]

    run = damaged("duplicated")  # a shard rewritten with one row twice, its marker made consistent
    path = run / "samples" / "shard-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)
    marker_path = run / "samples" / "_markers" / "shard-00000.json"
    marker = json.loads(marker_path.read_text())
    marker.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), rows=9)
    marker_path.write_text(json.dumps(marker))
    found = problems(run)
    assert any(p.startswith("1 sample_ids present more than once") for p in found), found
    assert any(p.startswith("embeddings/shard-00000: rows are not aligned") for p in found), found

    run = damaged("unfinished")  # an interrupted write: no marker, a temporary file
    (run / "samples" / "_markers" / "shard-00003.json").unlink()
    (run / "samples" / ".shard-00003.parquet.tmp-1-abc").write_bytes(b"partial")
    found = problems(run, notes=True)
    assert found[0].startswith("note: samples/shard-00003: file without a completion marker")
    assert any("1 of 4 samples shards not complete yet" in p for p in found)
    assert not [p for p in found if not p.startswith("note: ")]  # resumable, not damaged


@pytest.mark.slow  # ~30 s (a tmpfs filled up while a run writes); run by hand (--run-slow) before a release
def test_a_full_disk_stops_the_run_clearly_and_loses_nothing(first_run: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with small_disk(tmp_path / "disk", "16m") as disk:
        cfg, run = _copy_of_first_run(first_run, disk)
        store = RunStore(run)
        for shard in SHARDS[2:]:  # two shards still to generate
            store.shard_path("samples", shard).unlink()
            store.marker_path("samples", shard).unlink()
        finished = _state(run)
        filler = fill(disk)
        capsys.readouterr()
        assert main(["-q", "run", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert "No space left on device while writing" in err and "then run again" in err, err
        assert "Traceback" not in err and "retrying" not in err, err  # stopped at once, not retried elsewhere
        assert len([line for line in err.splitlines() if line.startswith("memaudit:")]) == 1, err
        assert _state(run) == finished  # the complete shards are untouched ...
        assert not [p.name for p in (run / "samples").iterdir() if p.is_file() and p.name.startswith(".")]
        assert all(store.read_marker("samples", s) is None for s in SHARDS[2:])  # ... and nothing partial counts
        filler.unlink()
        assert main(["run", str(cfg)]) == 0
        assert payload(run) == payload(first_run["run"])
        assert main(["verify", str(run)]) == 0


def test_a_read_only_run_root_is_refused_before_any_work(first_run: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = _copy_of_first_run(first_run, tmp_path / "rw")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with read_only_view(tmp_path / "rw" / "runs", tmp_path / "ro") as view:
        read_only = write_config(tmp_path / "ro.yaml", **{**_load(cfg), "run": {"root": str(view), "seed": 0}})
        capsys.readouterr()
        assert main(["run", str(read_only)]) == 1
        err = capsys.readouterr().err
        assert f"run.root {view}: cannot write to {view} (" in err and "nothing was written" in err, err
        assert main(["verify", str(view / run.relative_to(tmp_path / "rw" / "runs"))]) == 0  # reading still works
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_more_workers_than_the_cluster_can_place_still_finish(first_run: dict, tmp_path: Path) -> None:
    cfg, run = _copy_of_first_run(first_run, tmp_path)
    for shard in SHARDS[1:]:  # 3 shards for 3 one-CPU workers on a 2-CPU Ray: the third never starts
        (run / "samples" / f"{shard}.parquet").unlink()
    code = main(["-q", "run", str(cfg), "--no-report", "--set", "compute.num_workers=3",
                 "--set", "compute.cpus_per_worker=1"])
    assert code == 0 and payload(run).keys() == payload(first_run["run"]).keys()  # (1 thread each: other roundings)
    assert main(["verify", str(run)]) == 0
