"""The tiny real checkpoint: CLIP tokenizer built offline, save_pretrained/from_pretrained with
safetensors, built-in cache, and the checks run before any worker loads a model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from audit.config import GenerationSection, ModelSection
from audit.errors import InputError
from audit.generate.loading import checkpoint_digest, load_pipeline, preflight, resolve_model
from audit.testbed.checkpoints import builtin_checkpoint
from audit.testbed.tokenizer import clip_tokenizer

TEXTS = [
    "a photo of a cat",
    "An ASTRONAUT riding a horse, 4k!!  trending on artstation",
    "café <script>alert(1)</script> 東京 🚀",
    "it's the dog's toy; they're here",
    " ".join(["long"] * 120),
]


def test_tokenizer_matches_open_clip() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    ours, reference = clip_tokenizer(), SimpleTokenizer()
    assert len(ours) == 49408
    for text in TEXTS:
        expected = [reference.sot_token_id] + reference.encode(text) + [reference.eot_token_id]
        got = ours(text)["input_ids"]
        assert got == expected[: len(got)]
        padded = ours(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert len(padded) == 77 and padded[0] == reference.sot_token_id


def test_saved_as_safetensors_and_loaded_with_from_pretrained(tiny_checkpoint: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    files = {p.suffix for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".ckpt", ".pt"}
    pipe = DiffusionPipeline.from_pretrained(tiny_checkpoint, use_safetensors=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.tokenizer("a photo of a cat")["input_ids"] == clip_tokenizer()("a photo of a cat")["input_ids"]
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_builtin_is_built_once_and_deterministic(tiny_checkpoint: Path) -> None:
    folder = builtin_checkpoint("tiny")
    assert builtin_checkpoint("tiny") == folder
    assert checkpoint_digest(folder)["sha256"] == checkpoint_digest(tiny_checkpoint)["sha256"]
    with pytest.raises(InputError, match="unknown built-in checkpoint 'builtin:huge'; available: builtin:testbed, builtin:testbed-maps, builtin:tiny"):
        builtin_checkpoint("huge")


def test_location_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(InputError, match="model.path: directory .*missing does not exist"):
        resolve_model(ModelSection(path=str(tmp_path / "missing")))
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file; give a diffusers pipeline folder"):
        resolve_model(ModelSection(path=str(tmp_path / "file.safetensors")))
    with pytest.raises(InputError, match="no model_index.json"):
        resolve_model(ModelSection(path=str(tmp_path)))
    with pytest.raises(InputError, match="could not be fetched as a Hugging Face Hub id"):
        resolve_model(ModelSection(path="memaudit-test/not-a-real-model"))
    assert resolve_model(ModelSection(path=str(tiny_checkpoint))).folder == tiny_checkpoint.resolve()


def _break(folder: Path, how: str) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "missing_component":
        shutil.rmtree(folder / "vae")
    elif how == "no_weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage_header":
        weights.write_bytes(b"\xff" * 64)
    elif how == "zero_bytes":
        weights.write_bytes(b"")
    elif how == "missing_shard":
        (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            '{"weight_map": {"conv_in.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}')


@pytest.mark.parametrize("how, message", [
    ("missing_component", r"lists component 'vae' in model_index.json but has no vae/ folder"),
    ("no_weights", r"component 'unet' of .* has a config.json but no weights file"),
    ("truncated", r"unet/diffusion_pytorch_model.safetensors is truncated \(\d+ of \d+ bytes\)"),
    ("garbage_header", r"unet/diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    ("zero_bytes", r"unet/diffusion_pytorch_model.safetensors is not a readable safetensors file"),
    ("missing_shard", r"names shards that are missing \(diffusion_pytorch_model-00002-of-00002"),
])
def test_a_partial_checkpoint_is_refused_before_any_weights_load(tmp_path: Path, tiny_checkpoint: Path,
                                                                 how: str, message: str) -> None:
    folder = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, folder)
    preflight(ModelSection(path=str(folder)), GenerationSection())  # whole: accepted
    _break(folder, how)
    with pytest.raises(InputError, match=message):
        preflight(ModelSection(path=str(folder)), GenerationSection())


def test_pickle_weights_need_explicit_opt_in(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from diffusers import DiffusionPipeline

    pickled = tmp_path / "pickled"
    DiffusionPipeline.from_pretrained(tiny_checkpoint).save_pretrained(pickled, safe_serialization=False)
    assert list(pickled.glob("unet/*.bin"))
    generation = GenerationSection()
    with pytest.raises(InputError, match=r"component '(text_encoder|unet|vae)' .* pickle-based weights .*model.allow_pickle: true"):
        preflight(ModelSection(path=str(pickled)), generation)
    section = ModelSection(path=str(pickled), allow_pickle=True)
    resolved, _ = preflight(section, generation)
    pipe = load_pipeline(section, resolved.folder, "cpu", "float32")
    assert list(pipe.unet.config.block_out_channels) == [32, 64]


def test_preflight_scheduler_and_resolution(tiny_checkpoint: Path) -> None:
    ok, info = preflight(ModelSection(path=str(tiny_checkpoint), scheduler="DDIMScheduler"), GenerationSection())
    assert info.class_name == "StableDiffusionPipeline" and info.default_size == 32
    assert "EulerDiscreteScheduler" in info.compatible_schedulers
    with pytest.raises(InputError, match=r"model.scheduler: 'FancyScheduler' .* allowed values: .*DDIMScheduler"):
        preflight(ModelSection(path=str(tiny_checkpoint), scheduler="FancyScheduler"), GenerationSection())
    with pytest.raises(InputError, match=r"generation.height: 31 is not a multiple of 8"):
        preflight(ModelSection(path=str(tiny_checkpoint)), GenerationSection(height=31))
    pipe = load_pipeline(ModelSection(path=str(tiny_checkpoint), scheduler="DDIMScheduler"), ok.folder, "cpu", "float32")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_digest_changes_with_content(tmp_path: Path, tiny_checkpoint: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    assert checkpoint_digest(copy) == checkpoint_digest(tiny_checkpoint)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("0.012", "0.0125"))
    assert checkpoint_digest(copy)["sha256"] != checkpoint_digest(tiny_checkpoint)["sha256"]
