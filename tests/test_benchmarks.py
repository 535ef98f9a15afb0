"""The benchmark runner's plumbing, on its one benchmark cheap enough for CI: FLOPs per image of
the full SD1.5 architecture counted on the meta device (shapes only, no arithmetic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_run_all_counts_sd15_flops_and_writes_the_summary(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--only", "flops", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    flops = json.loads((tmp_path / "flops.json").read_text())
    # SD1.5 at 512², 50 steps with CFG, plus the VAE decode: ~82.8 TFLOP per image (the figure)
    assert flops["image_side"] == 512 and 82.0 < flops["tflop_per_image"] < 83.6, flops
    assert 855e6 < flops["unet_params"] < 865e6  # the 860M-parameter SD1.5 UNet
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmarks"]["flops"]["ok"] and "TFLOP/image" in summary["benchmarks"]["flops"]["headline"]
    assert "| flops |" in done.stdout


def test_denoiser_variants_agree_with_the_default_forward(tmp_path: Path) -> None:
    """The speed-knob benchmark, shrunk (no compile: its first forward takes a minute on CPU)."""
    out = tmp_path / "variants.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "denoiser_variants.py"), "--forwards", "1", "--repeats", "1",
                           "--batch-size", "2", "--variants", "eager", "no-sdpa", "channels_last", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert set(result["seconds_per_forward"]) == {"eager", "no-sdpa", "channels_last"}
    assert all(error < 1e-4 for error in result["max_abs_diff"].values()), result["max_abs_diff"]
    assert result["speedup_vs_eager"]["eager"] == 1.0 and "| channels_last |" in done.stdout


@pytest.mark.slow  # ~20 s (meta-device T5-XXL and bigG); the SD1.5 count runs in every suite
def test_flops_counts_full_size_sdxl_and_sd3(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-size configs (benchmarks/full_architectures.py) have the released models' sizes,
    and their per-step and per-image FLOPs are counted on the meta device."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from flops import count

    sdxl = count("sdxl", 50, None)
    assert sdxl["image_side"] == 1024 and sdxl["denoiser"] == "UNet"
    assert 2.55e9 < sdxl["unet_params"] < 2.58e9  # SDXL base's 2.6B-parameter UNet
    assert 690e6 < sdxl["params"]["text_encoder_2"] < 700e6  # OpenCLIP bigG's text tower + projection
    assert set(sdxl["flops"]) == {"unet_call", "vae_decode", "text_encoder", "text_encoder_2"}
    assert sdxl["flops_per_step"] == sdxl["flops"]["unet_call"]
    assert 50 * sdxl["flops_per_step"] < sdxl["flops_per_image"] < 51 * sdxl["flops_per_step"]
    sd3 = count("sd3", 28, None)
    assert sd3["image_side"] == 1024 and sd3["denoiser"] == "transformer" and "unet_params" not in sd3
    assert 2.0e9 < sd3["denoiser_params"] < 2.05e9  # SD3 medium's 2B MMDiT
    assert 4.7e9 < sd3["params"]["text_encoder_3"] < 4.8e9  # T5 v1.1 XXL's encoder
    # the MMDiT at 4096 image + 333 text tokens costs more per step than SDXL's UNet at 1024²
    assert sd3["flops_per_step"] > sdxl["flops_per_step"]


def test_generation_refuses_full_sdxl_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, str(BENCHMARKS / "generation.py"), "--arch", "sdxl"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--tiny" in done.stderr, done.stderr


@pytest.mark.slow  # tests/test_families.py runs builtin:tiny-sdxl through the same stage in every suite
def test_scaled_down_sdxl_checkpoint_runs_through_the_generation_stage(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the GPU profile's SDXL generation benchmark builds and times, at CPU-sized widths: a
    random-weight StableDiffusionXLPipeline saved as safetensors, loaded and run by memaudit's
    generation stage (two encoders, added text/time conditions, CFG noise magnitude, PNGs)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import numpy as np

    from audit.config import load_config
    from audit.generate.sampling import GenerateStage
    from generation import _checkpoint

    folder = Path(_checkpoint("sdxl-tiny", tmp_path))
    assert '"StableDiffusionXLPipeline"' in (folder / "model_index.json").read_text()
    assert {p.suffix for p in (folder / "unet").iterdir()} >= {".safetensors"}
    (tmp_path / "prompts.txt").write_text("a photograph\n")
    cfg = load_config(None, [f"model.path={folder}", "model.device=cpu", f"prompts.source={tmp_path / 'prompts.txt'}",
                             f"run.root={tmp_path / 'runs'}", "generation.steps=2", "compute.batch_size=2"])
    stage = GenerateStage(cfg)
    assert type(stage.pipe).__name__ == "StableDiffusionXLPipeline"
    rows = stage({"sample_id": np.array(["s0", "s1"], dtype=object), "prompt_id": np.array(["p", "p"], dtype=object),
                  "prompt": np.array(["a photograph", "a photograph"], dtype=object),
                  "sample_idx": np.array([0, 1]), "seed": np.array([1, 2])})
    assert list(rows["status"]) == ["ok", "ok"], rows["error"]
    assert list(rows["width"]) == [32, 32] and np.isfinite(rows["noise_magnitude"]).all()


@pytest.mark.slow
def test_generation_benchmark_times_the_sdxl_pipeline_scaled_down(tmp_path: Path) -> None:
    """``generation.py --arch sdxl --tiny`` end to end (plain loop and Ray path; ~90 s on 2 cores,
    most of it starting Ray and its worker): one round of two 32² images, two steps."""
    out = tmp_path / "generation.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "generation.py"), "--arch", "sdxl", "--tiny",
                           "--prompts", "1", "--samples", "2", "--steps", "2", "--batch-size", "2",
                           "--prompts-per-shard", "1", "--repeats", "1", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["arch"] == "sdxl-tiny" and result["ray_images_per_s"] > 0 and result["plain_images_per_s"] > 0
    assert result["tflop_per_image"] > 0 and "arch sdxl-tiny" in done.stdout


def test_screen_benchmark_counts_and_times_the_screen_on_the_tiny_model(tmp_path: Path) -> None:
    """The GPU profile's roofline path of ``screen.py`` (the SD1.5 run is ``--profile gpu``) on the
    tiny checkpoint, without Ray: the screen stage timed, its FLOPs per prompt counted (~10 s)."""
    out = tmp_path / "screen.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "screen.py"), "--parts", "roofline", "--arch", "tiny",
                           "--roofline-prompts", "2", "--roofline-batch-size", "2", "--roofline-steps", "2",
                           "--seeds", "1", "--no-ray", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    roofline = json.loads(out.read_text())["roofline"]
    assert roofline["arch"] == "tiny" and roofline["seeds"] == 1 and roofline["stage_prompts_per_s"] > 0
    assert 0 < roofline["flops_per_prompt"] < roofline["generation_flops_per_prompt"]
    assert "FLOPs per screened prompt" in done.stdout and "| stage |" in done.stdout
