"""Tiny pipelines of the other diffusers families (audit.testbed.families): built offline as
built-in checkpoints, saved as safetensors, loaded back by diffusers; the offline T5 tokenizer;
``memaudit testbed build --arch``. tests/test_families.py runs each through ``memaudit run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audit.testbed.families import FAMILIES

# family -> (pipeline class, scheduler class, prediction type or None for flow matching)
EXPECTED = {
    "sd2": ("StableDiffusionPipeline", "EulerDiscreteScheduler", "v_prediction"),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", "epsilon"),
    "sd3": ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", None),
    "flux": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", None),
    "pixart": ("PixArtAlphaPipeline", "DPMSolverMultistepScheduler", "epsilon"),
}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def test_families_are_the_five() -> None:
    assert set(FAMILIES) == set(EXPECTED)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(family: str) -> Path:
    """The family's built-in checkpoint, built into this session's (temporary) cache."""
    from audit.testbed.checkpoints import builtin_checkpoint

    return builtin_checkpoint(f"tiny-{family}")


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_saved_as_safetensors(folder: Path) -> None:
    weights = [p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights


def test_loads_as_its_family(family: str, pipe: Any) -> None:
    pipeline_class, scheduler_class, prediction = EXPECTED[family]
    assert type(pipe).__name__ == pipeline_class
    assert type(pipe.scheduler).__name__ == scheduler_class
    if prediction is None:
        assert pipe.scheduler.config.shift == 3.0
        assert pipe.scheduler.config.use_dynamic_shifting == (family == "flux")
    else:
        assert pipe.scheduler.config.prediction_type == prediction
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    if family != "flux":  # FluxPipeline has no sample size of its own
        assert denoiser.config.sample_size * pipe.vae_scale_factor == 32
    if family == "pixart":
        assert denoiser.config.out_channels == 2 * denoiser.config.in_channels
    if family == "flux":
        assert denoiser.config.guidance_embeds
    if family in ("sd3", "flux"):
        assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None
    if family == "sdxl":
        assert pipe.config.force_zeros_for_empty_prompt
    kinds = {type(c).__name__: c for c in pipe.components.values()}
    if "T5EncoderModel" in kinds:  # the offline T5 tokenizer, and an encoder covering its ids
        assert kinds["T5EncoderModel"].config.vocab_size >= len(kinds["T5Tokenizer"])


def test_t5_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5Tokenizer

    from audit.testbed.t5_tokenizer import t5_tokenizer, vocab_size

    tokenizer = t5_tokenizer(model_max_length=120)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == vocab_size()
    captions = ["a red fox", "A photo of the blue teapot, 1990s", "café — ☕", ""]
    batch = tokenizer(captions, padding="max_length", max_length=24, truncation=True).input_ids
    assert all(len(ids) == 24 for ids in batch)
    assert batch[0][:4] == tokenizer("a red fox").input_ids and batch[0][3] == 1 and batch[0][4:] == [0] * 20
    assert 2 in batch[2]  # characters outside the vocabulary become <unk>
    assert max(max(ids) for ids in batch) < vocab_size()

    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for cls in (T5Tokenizer, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is T5Tokenizer and loaded.model_max_length == 120
        assert loaded(captions, padding="max_length", max_length=24, truncation=True).input_ids == batch


def test_cli_builds_a_loadable_sdxl(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from diffusers import DiffusionPipeline

    from audit.cli import main
    from audit.testbed.checkpoints import builtin_checkpoint

    out = tmp_path / "sdxl"
    assert main(["testbed", "build", str(out), "--arch", "sdxl"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert type(DiffusionPipeline.from_pretrained(out, use_safetensors=True)).__name__ == "StableDiffusionXLPipeline"
    # Seeded: the same bytes as the built-in checkpoint, built by the cache's builder.
    builtin = builtin_checkpoint("tiny-sdxl")
    for weights in sorted(out.rglob("*.safetensors")):
        assert weights.read_bytes() == (builtin / weights.relative_to(out)).read_bytes(), weights
