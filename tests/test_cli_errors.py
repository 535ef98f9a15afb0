"""Bad input: one line on stderr naming the problem, exit code 2, nothing written.

Every check here runs before Ray starts, so a mistake costs seconds, not a cluster start-up."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from audit.cli import main
from helpers import write_config


def _valid(tmp_path: Path, checkpoint: Path, prompts: Path) -> dict:
    return {
        "run": {"root": str(tmp_path / "runs")},
        "model": {"path": str(checkpoint)},
        "prompts": {"source": str(prompts)},
        "generation": {"steps": 4},
    }


def _pickled(tmp_path: Path, checkpoint: Path) -> str:
    from diffusers import DiffusionPipeline

    folder = tmp_path / "pickled"
    DiffusionPipeline.from_pretrained(checkpoint).save_pretrained(folder, safe_serialization=False)
    return str(folder)


CASES: dict[str, tuple[Callable[[Path, Path, dict], None], str]] = {
    "missing prompt file": (
        lambda tmp, ck, cfg: cfg["prompts"].update(source=str(tmp / "nope.txt")),
        r"prompts\.source: .*nope\.txt does not exist",
    ),
    "empty prompt file": (
        lambda tmp, ck, cfg: (tmp / "empty.txt").write_text("\n \n") and cfg["prompts"].update(source=str(tmp / "empty.txt")),
        r"empty\.txt contains no prompts",
    ),
    "unknown config key": (
        lambda tmp, ck, cfg: cfg["generation"].update(num_steps=3),
        r"unknown key 'generation\.num_steps'; allowed keys here: samples_per_prompt, steps",
    ),
    "missing checkpoint directory": (
        lambda tmp, ck, cfg: cfg["model"].update(path=str(tmp / "no-such-model")),
        r"model\.path: directory .*no-such-model does not exist",
    ),
    "pickle weights without opt-in": (
        lambda tmp, ck, cfg: cfg["model"].update(path=_pickled(tmp, ck)),
        r"pickle-based weights .* set model\.allow_pickle: true",
    ),
    "zero steps": (
        lambda tmp, ck, cfg: cfg["generation"].update(steps=0),
        r"generation\.steps: Input should be greater than 0 \(got 0\)",
    ),
    "negative steps": (
        lambda tmp, ck, cfg: cfg["generation"].update(steps=-5),
        r"generation\.steps: Input should be greater than 0 \(got -5\)",
    ),
    "scheduler the pipeline cannot use": (
        lambda tmp, ck, cfg: cfg["model"].update(scheduler="NotAScheduler"),
        r"model\.scheduler: 'NotAScheduler' is not a scheduler StableDiffusionPipeline can use",
    ),
    "float16 on cpu": (
        lambda tmp, ck, cfg: cfg["model"].update(dtype="float16", device="cpu"),
        r"model\.dtype: float16 is not supported on CPU",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nonzero_nothing_written(
    case: str, tmp_path: Path, tiny_checkpoint: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, pattern = CASES[case]
    cfg = _valid(tmp_path, tiny_checkpoint, prompt_file)
    mutate(tmp_path, tiny_checkpoint, cfg)
    path = write_config(tmp_path / "audit.yaml", **cfg)
    code = main(["-q", "run", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("memaudit: error:")]
    assert code == 2
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.yaml"
    path.write_text("model:\n  path: x\n generation: [\n", encoding="utf-8")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"memaudit: error: {path}:") and "malformed YAML" in err[0]


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_config_command_prints_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "generation.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "noise_magnitude_steps: 1" in out and "allow_pickle: false" in out


def test_testbed_build_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    assert main(["testbed", "build", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "file").read_text() == "keep me"
