"""The denoiser's speed knobs, side by side: SDPA attention, channels_last, torch.compile.

One UNet forward at the generation batch shape (CFG: 2 x batch latents, text states of 77
tokens), timed per variant after a warm-up (compilation happens there), rounds alternating the
variants so drift hits them alike; the medians are compared with the eager SDPA forward, which is
what `memaudit run` uses by default. Each variant is checked against it numerically (max |diff|).

- ``eager``: diffusers' default attention processor (``F.scaled_dot_product_attention``);
- ``no-sdpa``: the classic attention processor (explicit softmax(QK^T)V), for comparison;
- ``channels_last``: ``model.channels_last: true``;
- ``compile``: ``model.compile: true`` (``torch.compile`` of the denoiser);
- ``compile+channels_last``.

    python benchmarks/denoiser_variants.py                          # tiny checkpoint, CPU
    python benchmarks/denoiser_variants.py --arch sd15 --size 512 --batch-size 16   # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("eager", "no-sdpa", "channels_last", "compile", "compile+channels_last")


def _unet(arch_name: str, variant: str, state: dict[str, torch.Tensor] | None, device: str, dtype: torch.dtype) -> Any:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    from audit.testbed.architectures import ARCHITECTURES

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**ARCHITECTURES[arch_name].unet).eval()
    if state is not None:
        unet.load_state_dict(state)
    unet = unet.to(device=device, dtype=dtype)
    if variant == "no-sdpa":
        unet.set_attn_processor(AttnProcessor())
    if "channels_last" in variant:
        unet = unet.to(memory_format=torch.channels_last)
    if "compile" in variant:
        unet = torch.compile(unet)
    return unet


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=("tiny", "testbed", "sd15"))
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (CFG doubles it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--forwards", type=int, default=20, help="timed forwards per variant and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import diffusers

    from audit.testbed.architectures import ARCHITECTURES

    diffusers.utils.logging.set_verbosity_error()  # casting a freshly built UNet with .to() is intended here
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    arch = ARCHITECTURES[args.arch]
    scale = 2 ** (len(arch.vae["block_out_channels"]) - 1)  # the VAE's downsampling factor
    latent = args.size // scale if args.size else int(arch.unet["sample_size"])
    rows = 2 * args.batch_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, int(arch.unet["in_channels"]), latent, latent, generator=generator)
    text = torch.randn(rows, 77, int(arch.unet.get("cross_attention_dim", 1280)), generator=generator)
    inputs = {"sample": latents.to(device, dtype), "timestep": torch.tensor(500, device=device),
              "encoder_hidden_states": text.to(device, dtype)}
    reference = _unet(args.arch, "eager", None, device, dtype)
    state = {k: v.float().cpu() for k, v in reference.state_dict().items()}
    models = {"eager": reference, **{v: _unet(args.arch, v, state, device, dtype) for v in args.variants if v != "eager"}}
    with torch.inference_mode():
        expected = reference(**inputs).sample.float()
        warmup: dict[str, float] = {}
        error: dict[str, float] = {}
        for name, model in models.items():
            start = time.perf_counter()
            out = model(**{**inputs, "sample": inputs["sample"].contiguous(memory_format=torch.channels_last)}
                        if "channels_last" in name else inputs).sample.float()
            _sync(device)
            warmup[name] = time.perf_counter() - start
            error[name] = float((out - expected).abs().max())
        per_forward: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(args.repeats):
            order = list(models) if round_ % 2 == 0 else list(models)[::-1]
            for name in order:
                sample = inputs["sample"].contiguous(memory_format=torch.channels_last) if "channels_last" in name \
                    else inputs["sample"]
                _sync(device)
                start = time.perf_counter()
                for _ in range(args.forwards):
                    models[name](**{**inputs, "sample": sample})
                _sync(device)
                per_forward[name].append((time.perf_counter() - start) / args.forwards)
    median = {name: statistics.median(times) for name, times in per_forward.items()}
    print(f"{args.arch} UNet, {latent}x{latent} latents, {args.batch_size} images per forward (x2 CFG), "
          f"{device} {dtype_name}, {args.forwards} forwards x {args.repeats} rounds")
    print("| variant | ms per forward (median) | vs eager SDPA | first forward (s) | max abs diff vs eager |")
    print("|---|---|---|---|---|")
    for name in models:
        print(f"| {name} | {1000 * median[name]:.2f} | {median['eager'] / median[name]:.3f}x | {warmup[name]:.1f} | "
              f"{error[name]:.2e} |")
    if args.json:
        result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                  "dtype": dtype_name, "seconds_per_forward": median, "rounds": per_forward,
                                  "first_forward_s": warmup, "max_abs_diff": error,
                                  "speedup_vs_eager": {n: median["eager"] / median[n] for n in models}}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
