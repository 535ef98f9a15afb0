"""The benchmark runner's plumbing, on its one benchmark cheap enough for CI: FLOPs per image of
the full SD1.5 architecture counted on the meta device (shapes only, no arithmetic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
