"""Every supported pipeline family, end to end on a local Ray: tiny real checkpoints of each
(built by `memaudit testbed build --arch ...`), generated through `memaudit run`, and the noise
magnitude checked against two explicit denoiser calls converted to noise independently here."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from audit.cli import main
from audit.generate.png import decode_png
from helpers import write_config

PROMPTS = ["a quiet lantern near the harbor, oil painting", "a rusty robot beside a giant cactus"]
STEPS = 3
# family -> (builtin checkpoint, extra generation settings, prediction type)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "sd2": ("tiny-sd2", {}, "v_prediction"),
    "sdxl": ("tiny-sdxl", {}, "epsilon"),
    "sd3": ("tiny-sd3", {}, "flow"),
    "flux": ("tiny-flux", {"noise_magnitude_extra_uncond": True}, "flow"),
    "pixart": ("tiny-pixart", {}, "epsilon"),
}
FAMILY_NAMES = {"sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "pixart": "pixart"}


def _run(folder: Path, builtin: str, extra: dict[str, Any], batch_size: int) -> Path:
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    cfg = write_config(
        folder / "audit.yaml",
        run={"root": str(folder / "runs"), "seed": 0},
        model={"path": f"builtin:{builtin}"},
        prompts={"source": str(prompts)},
        generation={"samples_per_prompt": 2, "steps": STEPS, "prompts_per_shard": 2, "height": 32, "width": 32,
                    "guidance_scale": 4.0, **extra},
        compute={"batch_size": batch_size, "num_workers": 1},
    )
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", str(cfg), "--no-report"])
    assert code == 0, out.getvalue()
    line = next(line for line in out.getvalue().splitlines() if line.startswith("run: "))
    return Path(line.removeprefix("run: "))


# SD3 (flow, batched CFG) runs on Ray in every suite. SD2-v, SDXL, PixArt and Flux (flow, extra
# unconditional call) (~12-20 s each on Ray) run by hand (--run-slow): their conversions (v, ε,
# learned variance, flow) are checked exactly in test_the_conversions_recover_the_noise_exactly, and
# SDXL, SD3 and Flux go through the generation stage in tests/test_lora.py, in every suite.
BY_HAND = {"sd2", "sdxl", "pixart", "flux"}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name in BY_HAND else [])
                                        for name in sorted(FAMILIES)])
def family_run(request: pytest.FixtureRequest, ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    name = request.param
    builtin, extra, _ = FAMILIES[name]
    run = _run(tmp_path_factory.mktemp(f"{name}-b2"), builtin, extra, batch_size=2)
    samples = pq.read_table(run / "samples").to_pylist()
    return {"name": name, "run": run, "samples": sorted(samples, key=lambda r: r["sample_id"])}


def test_every_sample_is_generated_with_finite_pixels_and_run_json_records_the_family(family_run: dict) -> None:
    name = family_run["name"]
    assert len(family_run["samples"]) == 4
    for row in family_run["samples"]:
        assert row["status"] == "ok", row["error"]
        pixels = decode_png(row["image_png"])
        assert pixels.shape == (32, 32, 3) and pixels.std() > 0
        assert math.isfinite(row["noise_magnitude"]) and row["noise_magnitude"] > 0
    record = json.loads((family_run["run"] / "run.json").read_text())["family"]
    assert record["name"] == FAMILY_NAMES[name]
    assert record["prediction_type"] == FAMILIES[name][2]
    assert record["adapters"] == [] and record["noise_magnitude_nan_reason"] is None
    assert record["extra_uncond_calls_per_batch"] == (1 if name == "flux" else 0)


def _split(value: Any, half: int, n: int) -> Any:
    """The ``half``-th half of every batched tensor in a call's arguments (CFG batches [uncond, cond])."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 2 * n:
        return value[half * n:(half + 1) * n]
    if isinstance(value, dict):
        return {k: _split(v, half, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, half, n) for v in value)
    return value


def _to_noise(pipe: Any, prediction: str, step: int, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Noise from a denoiser output, with the schedule read from the scheduler's own state."""
    output, x = output.double(), x.double()
    if output.shape[1] == 2 * x.shape[1] and output.ndim == 4:
        output = output[:, : x.shape[1]]
    sigma = float(pipe.scheduler.sigmas[step])
    if prediction == "flow":
        return x + (1 - sigma) * output
    if prediction == "v_prediction":  # Euler: sigma is sqrt((1 - abar) / abar)
        abar = 1.0 / (1.0 + sigma**2)
        return math.sqrt(abar) * output + math.sqrt(1 - abar) * x
    return output


def _explicit_magnitudes(folder: Path, name: str, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """Run the pipeline as the generation stage does (one batch), then redo its first informative
    denoiser call as two explicit calls, conditional and unconditional."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    captured: list[tuple[tuple, dict]] = []
    handle = denoiser.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((_clone(args), _clone(kwargs))), with_kwargs=True)
    call: dict[str, Any] = {"prompt": prompts, "num_inference_steps": STEPS, "height": 32, "width": 32,
                            "guidance_scale": 4.0, "output_type": "pt",
                            "generator": [torch.Generator().manual_seed(s) for s in seeds]}
    if name == "pixart":
        call.update(use_resolution_binning=False, clean_caption=False)
    with torch.inference_mode():
        pipe(**call)
    handle.remove()
    prediction = FAMILIES[name][2]
    step = 1 if prediction == "flow" else 0  # a flow's first step is at sigma = 1: no text signal
    args, kwargs = captured[step]
    n = len(prompts)
    with torch.inference_mode():
        if name == "flux":
            cond = denoiser(*args, **kwargs)[0]
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=[""] * n, prompt_2=None)
            uncond = denoiser(*args, **{**kwargs, "encoder_hidden_states": embeds, "pooled_projections": pooled,
                                        "txt_ids": text_ids})[0]
            x = kwargs["hidden_states"]
            x_u = x_c = x
        else:
            uncond = denoiser(*_split(args, 0, n), **_split(kwargs, 0, n))[0]
            cond = denoiser(*_split(args, 1, n), **_split(kwargs, 1, n))[0]
            x = kwargs.get("hidden_states", args[0] if args else None)
            x_u, x_c = x[:n], x[n:]
    eps_c = _to_noise(pipe, prediction, step, cond, x_c)
    eps_u = _to_noise(pipe, prediction, step, uncond, x_u)
    return (eps_c - eps_u).flatten(1).norm(dim=1).float().numpy()


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def test_noise_magnitude_equals_two_explicit_denoiser_calls_converted_to_noise(family_run: dict) -> None:
    from audit.testbed.checkpoints import builtin_checkpoint

    name = family_run["name"]
    folder = builtin_checkpoint(FAMILIES[name][0])
    prompts = {r["prompt_id"]: r["prompt"] for r in pq.read_table(family_run["run"] / "prompts").to_pylist()}
    first = [r for r in family_run["samples"] if r["prompt_id"] == family_run["samples"][0]["prompt_id"]]
    expected = _explicit_magnitudes(folder, name, [prompts[r["prompt_id"]] for r in first], [r["seed"] for r in first])
    recorded = np.array([r["noise_magnitude"] for r in first])
    np.testing.assert_allclose(recorded, expected, rtol=1e-4, atol=1e-4)


def test_pixels_agree_at_batch_sizes_2_and_4_to_the_last_rounding(family_run: dict) -> None:
    """The Ray run generated at batch size 2; the same rows at batch size 4, in this process."""
    from audit.config import load_config
    from audit.generate.sampling import GenerateStage

    builtin, extra, _ = FAMILIES[family_run["name"]]
    rows = family_run["samples"]
    prompts = {r["prompt_id"]: r["prompt"] for r in pq.read_table(family_run["run"] / "prompts").to_pylist()}
    cfg = load_config(None, [f"model.path=builtin:{builtin}", f"generation.steps={STEPS}", "generation.height=32",
                             "generation.width=32", "generation.guidance_scale=4.0", "compute.batch_size=4",
                             *(f"generation.{k}={str(v).lower()}" for k, v in extra.items())])
    batch = {"sample_id": np.array([r["sample_id"] for r in rows], dtype=object),
             "prompt_id": np.array([r["prompt_id"] for r in rows], dtype=object),
             "prompt": np.array([prompts[r["prompt_id"]] for r in rows], dtype=object),
             "sample_idx": np.array([r["sample_idx"] for r in rows]), "seed": np.array([r["seed"] for r in rows])}
    again = GenerateStage(cfg, "cpu", "float32").generate(batch)
    # Seeds and initial noise never depend on batching; kernels picked by batch shape may round
    # the last float bit differently, moving a few 8-bit values by one level (as for SD1 in
    # test_generate_stage.py), and nothing more.
    a = np.stack([decode_png(r["image_png"]) for r in rows]).astype(int)
    diff = np.abs(a - again.pixels.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))
    np.testing.assert_allclose(again.noise_magnitude, [r["noise_magnitude"] for r in rows], rtol=1e-4)


def test_the_conversions_recover_the_noise_exactly() -> None:
    """x_t built from known x0 and noise; each parametrisation's target converts back to that noise."""
    from audit.generate.noise import EpsilonConversion, alpha_bar_at

    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    alphas = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    assert alpha_bar_at(alphas, 981) == pytest.approx(alphas[981], rel=1e-12)
    for t in (981.0, 500.5, 20.0):
        abar = alpha_bar_at(alphas, t)
        x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
        v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
        for prediction, output in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
            converted = EpsilonConversion(prediction, 1000, alphas)(output, x_t, t)
            torch.testing.assert_close(converted.float(), eps, rtol=1e-5, atol=1e-4)
            learned_variance = torch.cat([output, torch.randn(output.shape, generator=generator)], dim=1)  # PixArt
            converted = EpsilonConversion(prediction, 1000, alphas)(learned_variance, x_t, t)
            torch.testing.assert_close(converted.float(), eps, rtol=1e-5, atol=1e-4)
    flow = EpsilonConversion("flow", 1000, None, timestep_scale=1000.0)  # Flux: the transformer gets t / 1000
    for sigma in (0.9, 0.5, 0.1):
        x_t = (1 - sigma) * x0 + sigma * eps
        torch.testing.assert_close(flow(eps - x0, x_t, sigma).float(), eps, rtol=1e-5, atol=1e-5)
    assert flow.weight(1.0) == 0.0 and flow.weight(0.5) == 0.5  # sigma = 1: no text signal, not counted


def test_a_guidance_distilled_model_records_nan_and_why_unless_asked_for_the_extra_call() -> None:
    from audit.config import load_config
    from audit.generate.loading import preflight
    from audit.generate.sampling import GenerateStage

    cfg = load_config(None, ["model.path=builtin:tiny-flux", "generation.steps=2", "generation.height=32",
                             "generation.width=32", "compute.batch_size=2"])
    _, info = preflight(cfg.model, cfg.generation)
    record = info.record(cfg.generation)
    assert record["cfg"] is False and record["noise_magnitude"] is None
    assert "guidance-distilled" in record["noise_magnitude_nan_reason"]
    assert "noise_magnitude_extra_uncond" in record["noise_magnitude_nan_reason"]
    rows = {"seed": np.array([1, 2]), "prompt": np.array(PROMPTS, dtype=object)}
    raw = GenerateStage(cfg, "cpu", "float32").generate(rows)
    assert raw.error is None and raw.finite.all() and np.isnan(raw.noise_magnitude).all()
