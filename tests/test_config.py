"""The run config: frozen, typed, unknown keys rejected, errors that name key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from audit.config import AuditConfig, dump_config, fingerprint, load_config
from audit.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audit.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_default_loads_with_documented_defaults() -> None:
    cfg = load_config(None)
    assert cfg.model.path == "builtin:testbed"
    assert cfg.prompts.source == "builtin:testbed"
    assert cfg.generation.samples_per_prompt == 4
    assert cfg.compute.num_workers == "auto"
    assert Path(cfg.run.root).is_absolute()


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(pydantic.ValidationError):
        cfg.generation.steps = 3  # type: ignore[misc]


def test_unknown_key_names_path_and_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "generation:\n  stepz: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "generation.stepz" in message
    assert "samples_per_prompt" in message and "steps" in message
    assert "\n" not in message


def test_unknown_section_lists_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*model, prompts, generation, compute, embedding, reference, detection"):
        load_config(_write(tmp_path, "modle:\n  path: x\n"))


def test_literal_error_lists_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.dtype: 'fp8' is not allowed; allowed values: 'auto', 'float32', 'float16' or 'bfloat16'"):
        load_config(_write(tmp_path, "model:\n  dtype: fp8\n"))


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(tmp_path: Path, steps: int) -> None:
    with pytest.raises(ConfigError, match=rf"generation\.steps: Input should be greater than 0 \(got {steps}\)"):
        load_config(_write(tmp_path, f"generation:\n  steps: {steps}\n"))


def test_wrong_type_and_bad_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"generation\.samples_per_prompt: Input should be a valid integer"):
        load_config(_write(tmp_path, "generation:\n  samples_per_prompt: many\n"))
    with pytest.raises(ConfigError, match=r"model\.device: 'gpu' is not allowed; allowed values: auto, cpu"):
        load_config(_write(tmp_path, "model:\n  device: gpu\n"))


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "generation:\n  steps: 10\n  bad: [1, 2\n")
    with pytest.raises(ConfigError, match=r"audit\.yaml:\d+:\d+: malformed YAML"):
        load_config(path)


def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    path = _write(tmp_path, "generation:\n  steps: 10\n  guidance_scale: 7.5\n  steps: 50\n")
    with pytest.raises(ConfigError, match=r"audit\.yaml:4:3: malformed YAML: key 'steps' appears twice"):
        load_config(path)
    assert load_config(_write(tmp_path, "generation:\n  steps: 10\n  guidance_scale: 7.5\n")).generation.steps == 10


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'generation' must be a mapping with keys: samples_per_prompt"):
        load_config(_write(tmp_path, "generation: 5\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    path = _write(tmp_path, "model:\n  path: ckpt\nprompts:\n  source: p.txt\nrun:\n  root: out\n")
    cfg = load_config(path)
    assert cfg.model.path == str(tmp_path / "ckpt")
    assert cfg.prompts.source == str(tmp_path / "p.txt")
    assert cfg.run.root == str(tmp_path / "out")
    # a relative model path that is not on disk may be a hub id and is kept as written
    assert load_config(_write(tmp_path, "model:\n  path: org/model\n")).model.path == "org/model"


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    cfg = load_config(None, ["generation.steps=7", "model.scheduler=DDIMScheduler"])
    assert cfg.generation.steps == 7 and cfg.model.scheduler == "DDIMScheduler"
    with pytest.raises(ConfigError, match="generation.stepz"):
        load_config(None, ["generation.stepz=7"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["generation.steps"])


def test_partition_values_must_be_folder_safe() -> None:
    with pytest.raises(ConfigError, match=r"run\.run_id: run_id must be letters"):
        load_config(None, ["run.run_id=../../etc"])


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["generation.steps=9"])
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_identity_ignores_compute_and_paths_but_not_sampling() -> None:
    base = load_config(None)
    ident = lambda c: fingerprint(c.result_identity("ck", "pr", "cpu", "float32"))  # noqa: E731
    assert ident(base) == ident(load_config(None, ["compute.batch_size=1", "compute.num_workers=3", "run.root=/elsewhere"]))
    assert ident(base) != ident(load_config(None, ["generation.steps=3"]))
    assert ident(base) != ident(load_config(None, ["run.seed=1"]))
    assert fingerprint(base.result_identity("ck", "pr", "cuda", "bfloat16")) != ident(base)
    assert isinstance(base, AuditConfig)
