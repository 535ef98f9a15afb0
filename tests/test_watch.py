"""`memaudit watch`: new checkpoints audited exactly once, compared with their predecessor,
across repeated and concurrent invocations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit.cli import main
from audit.testbed.architectures import TINY, build_pipeline, save_pipeline
from audit.watch_state import FolderState, find_checkpoints, natural_key
from helpers import PROMPTS, write_config


def make_setup(tmp: Path, names: list[str]) -> tuple[Path, Path]:
    ckpts = tmp / "ckpts"
    for seed, name in enumerate(names):
        save_pipeline(build_pipeline(TINY, seed=seed), ckpts / name)
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    cfg = write_config(tmp / "watch.yaml", run={"root": str(tmp / "runs")}, prompts={"source": str(tmp / "prompts.txt")},
                       generation={"samples_per_prompt": 2, "steps": 2, "prompts_per_shard": 2},
                       compute={"batch_size": 4})
    return ckpts, cfg


def runs_of(root: Path) -> list[Path]:
    return sorted(root.glob("model=ckpts/checkpoint=*/run=*"))


def shard_times(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.glob("model=*/checkpoint=*/run=*/samples/*.parquet")}


def test_checkpoints_are_found_in_training_order(tmp_path: Path) -> None:
    for name in ("step-1000", "step-900", "step-10000", "notes"):
        (tmp_path / name).mkdir()
    for name in ("step-1000", "step-900", "step-10000"):
        (tmp_path / name / "model_index.json").write_text("{}")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step-900", "step-1000", "step-10000"]
    assert natural_key("a10") > natural_key("a9")


def test_a_held_lock_is_not_taken_twice(tmp_path: Path) -> None:
    state = FolderState(tmp_path)
    with state.lock("x.lock") as first:
        with state.lock("x.lock") as second:
            assert first and not second
    with state.lock("x.lock") as again:
        assert again  # released with its holder


@pytest.mark.slow  # ~60 s; test_remote.py runs the same flow with the state in a bucket in every suite
def test_watch_audits_each_new_checkpoint_once_and_compares_it(ray_local: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    ckpts, cfg = make_setup(tmp_path, ["step-900", "step-1000"])
    assert main(["watch", str(ckpts), str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "watch: 2 audited now, 0 already audited" in out and "compare step-900 -> step-1000" in out
    runs = runs_of(tmp_path / "runs")
    assert len(runs) == 2 and all((r / "report" / "index.html").is_file() for r in runs)
    state = tmp_path / "runs" / ".watch" / "ckpts"
    later = Path(json.loads((state / "step-1000.json").read_text())["run"])
    compared = json.loads((state / "step-1000.compared.json").read_text())
    assert Path(compared["compare"]).parent.parent.parent == later
    assert json.loads((Path(compared["compare"]).parent / "compare.json").read_text())["common_prompts"] == 2
    before = shard_times(tmp_path / "runs")

    assert main(["watch", str(ckpts), str(cfg)]) == 0  # nothing new: no audit, no Ray work, no compare
    assert "watch: 0 audited now, 2 already audited" in capsys.readouterr().out
    assert shard_times(tmp_path / "runs") == before

    save_pipeline(build_pipeline(TINY, seed=2), ckpts / "step-1100")
    assert main(["watch", str(ckpts), str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "watch: 1 audited now, 2 already audited" in out and "compare step-1000 -> step-1100" in out
    assert len(runs_of(tmp_path / "runs")) == 3 and shard_times(tmp_path / "runs").items() >= before.items()


@pytest.mark.slow  # ~50 s on 2 cores; keeps the default suite under CI's 15 minutes
def test_concurrent_watch_invocations_audit_each_checkpoint_exactly_once(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    ckpts, cfg = make_setup(tmp_path, ["step-1", "step-2"])
    command = [sys.executable, "-m", "audit.cli", "-q", "watch", str(ckpts), str(cfg)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    audited = [int(o.split("watch: ")[1].split(" audited")[0]) for o, _ in outs]
    assert sum(audited) == 2 and len(runs_of(tmp_path / "runs")) == 2  # each audited by exactly one of them
    markers = {json.loads(p.read_text())["run"] for p in (tmp_path / "runs" / ".watch" / "ckpts").glob("step-?.json")}
    assert len(markers) == 2 and (tmp_path / "runs" / ".watch" / "ckpts" / "step-2.compared.json").is_file()
    capsys.readouterr()
    assert main(["-q", "watch", str(ckpts), str(cfg)]) == 0  # and a third finds nothing to do
    assert "watch: 0 audited now, 2 already audited" in capsys.readouterr().out
