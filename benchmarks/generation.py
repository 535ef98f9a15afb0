"""Generation throughput: the Ray path of `memaudit run` vs a plain single-process loop.

Both use the same pipeline folder, settings, prompts, seeds and batch size, and both are timed
from a loaded pipeline to the last image (the first batch included, so warm-up counts for both):

- plain: ``pipe(prompts, generator=[...], output_type="pt")`` batch after batch in this process,
  images converted to uint8 and copied to the host — what a user would write by hand;
- ray: ``run_audit`` on a local Ray — actors, seeds, noise magnitude, PNG encoding and Parquet
  shards with atomic publish and markers — timed from the first shard's start to the last
  shard's end as the workers recorded them; start-up (worker, model load) is printed apart.

Rounds alternate plain and ray (each ray round is a new run with a new worker) and the medians are
compared, because a shared machine's speed drifts by several percent from minute to minute.

CPU (tiny checkpoint):  python benchmarks/generation.py
GPU (SD1.5 architecture, random weights run at the real speed), with the roofline percentage
(FLOPs per image counted by benchmarks/flops.py):
    python benchmarks/generation.py --arch sd15 --size 512 --steps 50 --batch-size 16 --prompts 8 --samples 32

SDXL: ``--arch sdxl`` builds a ``StableDiffusionXLPipeline`` with SDXL base 1.0's full-size shapes
(benchmarks/full_architectures.py) and random weights, on the GPU in bf16, saves it as safetensors
and times it the same way (1024², two text encoders, added text/time conditions); it needs a CUDA
GPU. ``--arch sdxl --tiny`` runs the same pipeline class at CPU-sized widths (32² images), to check
the SDXL path cheaply:
    python benchmarks/generation.py --arch sdxl --size 1024 --steps 50 --batch-size 8 --prompts 4 --samples 8
    python benchmarks/generation.py --arch sdxl --tiny --prompts 1 --samples 2 --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from audit.config import AuditConfig, load_config
from audit.generate.png import to_uint8
from audit.generate.loading import load_pipeline, resolve_numerics
from audit.plan import plan_prompts, shard_samples
from audit.prompts import read_prompts
from audit.testbed.architectures import ARCHITECTURES, build_pipeline, save_pipeline
from full_architectures import FULL_ARCHITECTURES, SDXLArchitecture, build_sdxl_pipeline

SDXL_ARCHES = sorted(name for name, arch in FULL_ARCHITECTURES.items() if isinstance(arch, SDXLArchitecture))


def _checkpoint(arch: str, folder: Path) -> str:
    """The pipeline folder (or builtin reference) of ``arch``, built with seeded random weights and
    saved in bf16 as safetensors under ``folder``."""
    if arch == "tiny":
        return "builtin:tiny"
    if arch in SDXL_ARCHES:  # built on the GPU when there is one: the full UNet's init is slow on CPU
        device = "cuda" if torch.cuda.is_available() else None
        pipe = build_sdxl_pipeline(FULL_ARCHITECTURES[arch], seed=0, device=device).to(torch.bfloat16)
    else:
        pipe = build_pipeline(ARCHITECTURES[arch], seed=0).to(torch.bfloat16)
    saved = save_pipeline(pipe, folder / arch)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the timed pipelines
    return str(saved)


def _arch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The architecture key to build: ``--arch``, or ``sdxl-tiny`` for ``--arch sdxl --tiny``;
    refuses the full SDXL without a CUDA GPU (building and running it on a CPU would take hours)."""
    if args.tiny:
        if args.arch != "sdxl":
            parser.error("--tiny scales down --arch sdxl only (for a CPU-sized SD1.5-shaped model use --arch tiny)")
        return "sdxl-tiny"
    if args.arch == "sdxl" and (args.device == "cpu" or not torch.cuda.is_available()):
        parser.error("--arch sdxl is the full SDXL base architecture (2.6B-parameter UNet, 1024² images) "
                     "and needs a CUDA GPU; add --tiny for the scaled-down SDXL pipeline on the CPU")
    return args.arch


def _config(args: argparse.Namespace, checkpoint: str, work: Path) -> AuditConfig:
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"benchmark prompt number {i}, a photograph" for i in range(args.prompts)))
    return load_config(None, [
        f"run.root={work / 'runs'}",
        f"model.path={checkpoint}",
        f"model.device={args.device}",
        f"model.dtype={args.dtype}",
        f"prompts.source={prompts}",
        f"generation.samples_per_prompt={args.samples}",
        f"generation.steps={args.steps}",
        f"generation.prompts_per_shard={args.prompts_per_shard}",
        f"compute.batch_size={args.batch_size}",
        f"compute.num_workers={args.workers}",
        *([f"generation.height={args.size}", f"generation.width={args.size}"] if args.size else []),
        f"model.compile={args.compile}",
        f"model.channels_last={args.channels_last}",
        "compute.embed_with_generation=false",  # generation alone (end_to_end.py measures both together)
    ])


def plain_loop(cfg: AuditConfig, keep: list | None = None) -> tuple[int, float]:
    """Images and seconds of a hand-written loop over the same samples (the uint8 images are
    appended to ``keep`` when given)."""
    from audit.generate.loading import resolve_model

    device, dtype = resolve_numerics(cfg.model, torch.cuda.is_available())
    pipe = load_pipeline(cfg.model, resolve_model(cfg.model).folder, device, dtype)
    plan = plan_prompts(read_prompts(cfg.prompts), cfg.generation.prompts_per_shard, cfg.prompts.limit)
    gen, size = cfg.generation, cfg.compute.batch_size
    rows = [shard_samples(s, gen.samples_per_prompt, cfg.run.seed) for s in plan.shards()]
    n = 0
    start = time.perf_counter()
    for shard in rows:
        for i in range(0, len(shard["seed"]), size):
            seeds = shard["seed"][i : i + size]
            with torch.inference_mode():
                images = pipe(
                    prompt=[str(p) for p in shard["prompt"][i : i + size]],
                    num_inference_steps=gen.steps,
                    guidance_scale=gen.guidance_scale,
                    height=gen.height,
                    width=gen.width,
                    generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                    output_type="pt",
                ).images
            pixels = to_uint8(images)[0]
            n += len(pixels)
            if keep is not None:
                keep.extend(pixels)
    return n, time.perf_counter() - start


def ray_path(cfg: AuditConfig) -> tuple[int, float, float]:
    """Images, generation window (s) and whole wall time (s) of `memaudit run`."""
    from audit.pipeline import run_audit

    start = time.perf_counter()
    result = run_audit(cfg)
    wall = time.perf_counter() - start
    report = result.generation
    return report.rows_written, report.busy_s, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES) + ["sdxl"], default="tiny")
    parser.add_argument("--tiny", action="store_true",
                        help="with --arch sdxl: SDXL's pipeline at CPU-sized widths (32² images), for a cheap check")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts-per-shard", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/ray rounds; medians reported")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (both paths)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last denoiser (both paths)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="bf16 peak of the accelerator, for the roofline percentage (GPU runs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    arch = _arch(parser, args)
    logging.basicConfig(level=logging.WARNING)
    from audit.pipeline import connect

    plain_rates, ray_rates, walls = [], [], []
    with tempfile.TemporaryDirectory(prefix="memaudit-bench-") as tmp:
        checkpoint = _checkpoint(arch, Path(tmp))
        connect(None)  # one local Ray for every round; each round still starts its own worker
        for round_ in range(args.repeats):
            work = Path(tmp) / f"round-{round_}"
            work.mkdir()
            cfg = _config(args, checkpoint, work)
            n_plain, s_plain = plain_loop(cfg)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the plain loop's pipeline is gone: its memory goes to the Ray worker
            n_ray, s_window, s_wall = ray_path(cfg)
            plain_rates.append(n_plain / s_plain)
            ray_rates.append(n_ray / s_window)
            walls.append(s_wall)
            print(f"round {round_}: plain {n_plain} images {s_plain:.2f} s, ray {n_ray} images {s_window:.2f} s "
                  f"(command {s_wall:.2f} s)", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    plain_rate, ray_rate = statistics.median(plain_rates), statistics.median(ray_rates)
    print(f"device: {device}; arch {arch}; {args.prompts} prompts x {args.samples} samples, "
          f"{args.steps} steps, batch {args.batch_size}, {args.workers} worker(s), {args.repeats} rounds")
    print(f"plain loop : {plain_rate:.3f} images/s (median; rounds: {', '.join(f'{r:.3f}' for r in plain_rates)})")
    print(f"ray path   : {ray_rate:.3f} images/s (median; rounds: {', '.join(f'{r:.3f}' for r in ray_rates)}); "
          f"whole command incl. worker start and model load: {statistics.median(walls):.2f} s")
    paired = statistics.median(r / p for r, p in zip(ray_rates, plain_rates))
    print(f"ratio ray/plain: {ray_rate / plain_rate:.3f} of the medians; {paired:.3f} median of the rounds' ratios "
          "(each round runs both back to back, so drift between rounds cancels)")
    from flops import count, roofline

    counted = count(arch, args.steps, args.size)
    result = {"device": device, "arch": arch,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "plain_images_per_s": plain_rate, "ray_images_per_s": ray_rate, "ratio": ray_rate / plain_rate,
              "paired_ratio": paired,
              "plain_rounds": plain_rates, "ray_rounds": ray_rates, "command_s": statistics.median(walls),
              "tflop_per_image": counted["tflop_per_image"]}
    if device != "cpu":
        limit = roofline(counted, args.peak_tflops)
        result |= {"peak_tflops": args.peak_tflops, "roofline_images_per_s": limit,
                   "ray_fraction_of_roofline": ray_rate / limit}
        print(f"roofline at {args.peak_tflops:.0f} TFLOP/s ({counted['tflop_per_image']:.2f} TFLOP per image, "
              f"counted): {limit:.2f} images/s; ray path at {100 * ray_rate / limit:.1f}% of it")
    else:
        print(f"{counted['tflop_per_image'] * 1e3:.2f} GFLOP per image (counted); "
              f"{ray_rate * counted['tflop_per_image'] * 1e3:.1f} GFLOP/s on this CPU")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
