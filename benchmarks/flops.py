"""FLOPs per generated image, counted with torch's FLOP counter, and the roofline they imply.

The pipeline's models are built from their configs on the ``meta`` device (shapes only: no memory,
no arithmetic), and one forward of each runs under ``torch.utils.flop_counter.FlopCounterMode``,
which adds up the FLOPs of every matmul, convolution and attention kernel:

    per image = steps x UNet(batch 2: CFG's unconditional + text half) + VAE decode
                + text encoder (prompt and negative prompt)

With ``--peak-tflops`` (the accelerator's dense bf16 peak, e.g. 989 for an H100 SXM, ~790 as
sustained in the issue's arithmetic) the roofline images/s follows; benchmarks/generation.py
divides a measured images/s by it.

    python benchmarks/flops.py                                  # SD1.5 at 512², 50 steps, CFG
    python benchmarks/flops.py --arch testbed --steps 20 --json flops.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def count(arch_name: str, steps: int, size: int | None, cfg: bool = True) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from audit.testbed.architectures import ARCHITECTURES

    arch = ARCHITECTURES[arch_name]
    scale = 2 ** (len(arch.vae["block_out_channels"]) - 1)
    latent = (size // scale) if size else int(arch.unet["sample_size"])
    pairs = 2 if cfg else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet).eval()
        vae = AutoencoderKL(**arch.vae).eval()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **arch.text)).eval()
        latents = torch.zeros(pairs, arch.unet["in_channels"], latent, latent)
        context = torch.zeros(pairs, 77, arch.unet["cross_attention_dim"])
        tokens = torch.zeros(pairs, 77, dtype=torch.long)
        one_latent = torch.zeros(1, arch.vae["latent_channels"], latent, latent)
    flops: dict[str, int] = {}
    with torch.no_grad():
        for name, run in (("unet_call", lambda: unet(latents, torch.tensor(500, device="meta"), context)),
                          ("vae_decode", lambda: vae.decode(one_latent)),
                          ("text_encoder", lambda: text(tokens))):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            flops[name] = int(counter.get_total_flops())
    per_image = steps * flops["unet_call"] + flops["vae_decode"] + flops["text_encoder"]
    return {"arch": arch_name, "image_side": latent * scale, "steps": steps, "cfg": cfg,
            "unet_params": sum(p.numel() for p in unet.parameters()), "flops": flops,
            "flops_per_image": per_image, "tflop_per_image": per_image / 1e12}


def roofline(result: dict[str, Any], peak_tflops: float) -> float:
    """Images/s an accelerator of ``peak_tflops`` would reach doing nothing but these FLOPs."""
    return peak_tflops * 1e12 / result["flops_per_image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=["tiny", "testbed", "sd15"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (0: the architecture's own)")
    parser.add_argument("--no-cfg", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak of the accelerator")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = count(args.arch, args.steps, args.size or None, cfg=not args.no_cfg)
    result["peak_tflops"] = args.peak_tflops
    result["roofline_images_per_s"] = roofline(result, args.peak_tflops)
    flops = result["flops"]
    print(f"{args.arch} at {result['image_side']}², {args.steps} steps, CFG {'on' if result['cfg'] else 'off'} "
          f"({result['unet_params'] / 1e6:.0f}M UNet parameters)")
    print("| part | GFLOP | per image |")
    print("|---|---|---|")
    print(f"| UNet call (batch {2 if result['cfg'] else 1}) | {flops['unet_call'] / 1e9:.1f} | x {args.steps} |")
    print(f"| VAE decode | {flops['vae_decode'] / 1e9:.1f} | x 1 |")
    print(f"| text encoder | {flops['text_encoder'] / 1e9:.1f} | x 1 |")
    print(f"total {result['tflop_per_image']:.2f} TFLOP per image; at {args.peak_tflops:.0f} TFLOP/s: "
          f"{result['roofline_images_per_s']:.2f} images/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
