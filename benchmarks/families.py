"""Generation speed of each pipeline family's tiny checkpoint through memaudit's generation stage,
side by side in one process, and the cost of Flux's extra unconditional call.

Each family's ``builtin:tiny-<family>`` (docs/model_families.md) generates the same batches
(``--batch-size`` samples of 32² pixels, ``--steps`` steps) in rounds that alternate the
families, so machine drift hits them alike; the median images/s per family is printed. ``flux`` is
timed twice, without and with ``generation.noise_magnitude_extra_uncond`` (K = 1), and their ratio
is the measured cost of the extra call. The tiny models differ in size, so the figures compare
code paths (text encoders, CFG, packing, T5 length), not the real models: for those see
``flops.py --arch sdxl|sd3`` and the GPU profile.

    python benchmarks/families.py                       # CPU, ~2 min
    python benchmarks/families.py --rounds 5 --json families.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = ("sd", "sd2", "sdxl", "sd3", "flux", "flux+extra_uncond", "pixart")


def _stage(variant: str, steps: int, batch_size: int) -> Any:
    from audit.config import load_config
    from audit.generate.sampling import GenerateStage

    builtin = "tiny" if variant == "sd" else f"tiny-{variant.split('+')[0]}"
    settings = [f"model.path=builtin:{builtin}", f"generation.steps={steps}", "generation.height=32",
                "generation.width=32", f"compute.batch_size={batch_size}", "generation.guidance_scale=4.0"]
    if variant.endswith("+extra_uncond"):
        settings.append("generation.noise_magnitude_extra_uncond=true")
    return GenerateStage(load_config(None, settings), "cpu", "float32")


def measure(steps: int, batch_size: int, rounds: int) -> dict[str, Any]:
    stages = {name: _stage(name, steps, batch_size) for name in FAMILIES}
    rows = {"seed": np.arange(batch_size), "prompt": np.array(["a quiet lantern near the harbor"] * batch_size,
                                                               dtype=object)}
    for stage in stages.values():  # warm-up
        stage.generate(rows)
    seconds: dict[str, list[float]] = {name: [] for name in FAMILIES}
    for _ in range(rounds):
        for name, stage in stages.items():
            started = time.perf_counter()
            raw = stage.generate(rows)
            seconds[name].append(time.perf_counter() - started)
            if raw.error is not None:
                raise RuntimeError(f"{name}: {raw.error}")
    result: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "rounds": rounds, "families": {}}
    for name, values in seconds.items():
        median = statistics.median(values)
        stage = stages[name]
        params = sum(p.numel() for p in stage.denoiser.parameters())
        result["families"][name] = {"images_per_s": batch_size / median, "seconds_per_batch": median,
                                    "denoiser_params": params, "pipeline": type(stage.pipe).__name__}
    paired = [b / a for a, b in zip(seconds["flux"], seconds["flux+extra_uncond"])]
    result["flux_extra_uncond_cost"] = statistics.median(paired)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.steps, args.batch_size, args.rounds)
    print(f"tiny checkpoints, 32² px, {args.steps} steps, batch {args.batch_size}, median of {args.rounds} rounds (CPU)")
    print(f"{'family':>20} {'pipeline':>28} {'denoiser params':>16} {'img/s':>8}")
    for name, row in result["families"].items():
        print(f"{name:>20} {row['pipeline']:>28} {row['denoiser_params']:>16,} {row['images_per_s']:>8.2f}")
    print(f"flux with the extra unconditional call (K = 1): {result['flux_extra_uncond_cost']:.3f}x the time "
          f"(median of paired rounds; one extra denoiser call on top of {args.steps})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
