"""FLOPs per generated image, counted with torch's FLOP counter, and the roofline they imply.

The pipeline's models are built from their configs on the ``meta`` device (shapes only: no memory,
no arithmetic), and one forward of each runs under ``torch.utils.flop_counter.FlopCounterMode``,
which adds up the FLOPs of every matmul, convolution and attention kernel:

    per step  = denoiser(batch 2: CFG's unconditional + text half)
    per image = steps x per step + VAE decode + text encoder(s) (prompt and negative prompt)

Architectures: ``tiny``, ``testbed`` and ``sd15`` (audit/testbed/architectures.py), and the
full-size ``sdxl`` (SDXL base 1.0: UNet with its added text/time conditions, CLIP-L + CLIP-G) and
``sd3`` (SD3 medium: MMDiT on 77 CLIP + 256 T5 tokens, CLIP-L + CLIP-G + T5-XXL), whose configs are
in benchmarks/full_architectures.py. sd15 and the testbeds default to 512², sdxl and sd3 to 1024².

With ``--peak-tflops`` (the accelerator's dense bf16 peak, e.g. 989 for an H100 SXM, ~790 as
sustained in the issue's arithmetic) the roofline images/s follows; benchmarks/generation.py
divides a measured images/s by it.

    python benchmarks/flops.py                                  # SD1.5 at 512², 50 steps, CFG
    python benchmarks/flops.py --arch sdxl                      # SDXL base at 1024²
    python benchmarks/flops.py --arch sd3 --steps 28            # SD3 medium at 1024²
    python benchmarks/flops.py --arch testbed --steps 20 --json flops.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from full_architectures import CLIP_TOKENS, FULL_ARCHITECTURES, SDXL_TIME_IDS, SD3Architecture, SDXLArchitecture
from full_architectures import clip_text_config, t5_config

DEFAULT_SIDE = {"sdxl": 1024, "sd3": 1024}  # image side when --size is not given; 512 otherwise


@dataclass(frozen=True)
class Part:
    """One model call of the pipeline: its key in the result, table label, module and forward."""

    key: str
    label: str
    module: Any  # torch.nn.Module on the meta device
    forward: Callable[[], Any]
    per_image: int  # calls per image: the steps for the denoiser, 1 otherwise


@dataclass(frozen=True)
class Pipeline:
    """The parts of one architecture at one image size; the first part is the denoiser."""

    parts: list[Part]
    denoiser: str  # "UNet" or "transformer"
    image_side: int


def _sd_parts(arch_name: str, steps: int, size: int | None, pairs: int) -> Pipeline:
    """SD1.5 and the testbeds: UNet, VAE, one CLIP text encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from audit.testbed.architectures import ARCHITECTURES

    arch = ARCHITECTURES[arch_name]
    scale = 2 ** (len(arch.vae["block_out_channels"]) - 1)
    latent = (size // scale) if size else int(arch.unet["sample_size"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet).eval()
        vae = AutoencoderKL(**arch.vae).eval()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **arch.text)).eval()
        latents = torch.zeros(pairs, arch.unet["in_channels"], latent, latent)
        context = torch.zeros(pairs, 77, arch.unet["cross_attention_dim"])
        tokens = torch.zeros(pairs, 77, dtype=torch.long)
        one_latent = torch.zeros(1, arch.vae["latent_channels"], latent, latent)
        timestep = torch.tensor(500)
    return Pipeline([
        Part("unet_call", f"UNet call (batch {pairs})", unet, lambda: unet(latents, timestep, context), steps),
        Part("vae_decode", "VAE decode", vae, lambda: vae.decode(one_latent), 1),
        Part("text_encoder", "text encoder", text, lambda: text(tokens), 1),
    ], "UNet", latent * scale)


def _sdxl_parts(arch: SDXLArchitecture, steps: int, size: int | None, pairs: int) -> Pipeline:
    """SDXL: the UNet with its added conditions (CLIP-G's pooled projection and the 6 size/crop
    numbers), the VAE, CLIP-L and CLIP-G. The released pipeline zeroes an empty negative prompt
    instead of encoding it (force_zeros_for_empty_prompt), so with no negative prompt the encoders
    run at batch 1; they are counted at the CFG batch, like SD1.5's (under 0.1% of the total)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    scale = 2 ** (len(arch.vae["block_out_channels"]) - 1)
    latent = (size // scale) if size else int(arch.unet["sample_size"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet).eval()
        vae = AutoencoderKL(**arch.vae).eval()
        text = CLIPTextModel(clip_text_config(arch.text)).eval()
        text_2 = CLIPTextModelWithProjection(clip_text_config(arch.text_2)).eval()
        latents = torch.zeros(pairs, arch.unet["in_channels"], latent, latent)
        context = torch.zeros(pairs, CLIP_TOKENS, arch.unet["cross_attention_dim"])
        added = {"text_embeds": torch.zeros(pairs, arch.text_2["projection_dim"]),
                 "time_ids": torch.zeros(pairs, SDXL_TIME_IDS)}
        tokens = torch.zeros(pairs, CLIP_TOKENS, dtype=torch.long)
        one_latent = torch.zeros(1, arch.vae["latent_channels"], latent, latent)
        timestep = torch.tensor(500)
    return Pipeline([
        Part("unet_call", f"UNet call (batch {pairs})", unet,
             lambda: unet(latents, timestep, context, added_cond_kwargs=added), steps),
        Part("vae_decode", "VAE decode", vae, lambda: vae.decode(one_latent), 1),
        Part("text_encoder", "text encoder (CLIP-L)", text, lambda: text(tokens, output_hidden_states=True), 1),
        Part("text_encoder_2", "text encoder 2 (CLIP-G)", text_2,
             lambda: text_2(tokens, output_hidden_states=True), 1),
    ], "UNet", latent * scale)


def _sd3_parts(arch: SD3Architecture, steps: int, size: int | None, pairs: int) -> Pipeline:
    """SD3: the MMDiT on 77 CLIP + ``t5_tokens`` T5 tokens (the CLIP states zero-padded to T5's
    width) and the 2048-wide pooled CLIP projections, the VAE, CLIP-L, CLIP-G and T5-XXL's encoder;
    the pipeline encodes the negative prompt too, so the encoders run at the CFG batch."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    scale = 2 ** (len(arch.vae["block_out_channels"]) - 1)
    latent = (size // scale) if size else int(arch.transformer["sample_size"])
    sequence = CLIP_TOKENS + arch.t5_tokens
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**arch.transformer).eval()
        vae = AutoencoderKL(**arch.vae).eval()
        text = CLIPTextModelWithProjection(clip_text_config(arch.text)).eval()
        text_2 = CLIPTextModelWithProjection(clip_text_config(arch.text_2)).eval()
        text_3 = T5EncoderModel(t5_config(arch.text_3)).eval()
        latents = torch.zeros(pairs, arch.transformer["in_channels"], latent, latent)
        context = torch.zeros(pairs, sequence, arch.transformer["joint_attention_dim"])
        pooled = torch.zeros(pairs, arch.transformer["pooled_projection_dim"])
        timestep = torch.full((pairs,), 500.0)
        clip_tokens = torch.zeros(pairs, CLIP_TOKENS, dtype=torch.long)
        t5_tokens = torch.zeros(pairs, arch.t5_tokens, dtype=torch.long)
        one_latent = torch.zeros(1, arch.vae["latent_channels"], latent, latent)
    return Pipeline([
        Part("transformer_call", f"transformer call (batch {pairs}, {sequence} text tokens)", transformer,
             lambda: transformer(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
                                 timestep=timestep), steps),
        Part("vae_decode", "VAE decode", vae, lambda: vae.decode(one_latent), 1),
        Part("text_encoder", "text encoder (CLIP-L)", text, lambda: text(clip_tokens, output_hidden_states=True), 1),
        Part("text_encoder_2", "text encoder 2 (CLIP-G)", text_2,
             lambda: text_2(clip_tokens, output_hidden_states=True), 1),
        Part("text_encoder_3", f"text encoder 3 (T5-XXL, {arch.t5_tokens} tokens)", text_3,
             lambda: text_3(t5_tokens), 1),
    ], "transformer", latent * scale)


def _pipeline(arch_name: str, steps: int, size: int | None, pairs: int) -> Pipeline:
    arch = FULL_ARCHITECTURES.get(arch_name)
    if isinstance(arch, SDXLArchitecture):
        return _sdxl_parts(arch, steps, size, pairs)
    if isinstance(arch, SD3Architecture):
        return _sd3_parts(arch, steps, size, pairs)
    return _sd_parts(arch_name, steps, size, pairs)


def count(arch_name: str, steps: int, size: int | None, cfg: bool = True) -> dict[str, Any]:
    """FLOPs of each model call, per step (one denoiser call) and per image, with parameter counts;
    ``size`` is the image side in pixels (``None``: the architecture's own)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pipeline = _pipeline(arch_name, steps, size, 2 if cfg else 1)
    flops: dict[str, int] = {}
    with torch.no_grad():
        for part in pipeline.parts:
            counter = FlopCounterMode(display=False)
            with counter:
                part.forward()
            flops[part.key] = int(counter.get_total_flops())
    params = {part.key: sum(p.numel() for p in part.module.parameters()) for part in pipeline.parts}
    denoiser = pipeline.parts[0]
    per_image = sum(part.per_image * flops[part.key] for part in pipeline.parts)
    result = {"arch": arch_name, "image_side": pipeline.image_side, "steps": steps, "cfg": cfg,
              "denoiser": pipeline.denoiser, "denoiser_params": params[denoiser.key], "params": params,
              "flops": flops, "flops_per_step": flops[denoiser.key], "tflop_per_step": flops[denoiser.key] / 1e12,
              "flops_per_image": per_image, "tflop_per_image": per_image / 1e12,
              "rows": [[part.label, flops[part.key], part.per_image] for part in pipeline.parts]}
    if pipeline.denoiser == "UNet":
        result["unet_params"] = params[denoiser.key]
    return result


def roofline(result: dict[str, Any], peak_tflops: float) -> float:
    """Images/s an accelerator of ``peak_tflops`` would reach doing nothing but these FLOPs."""
    return peak_tflops * 1e12 / result["flops_per_image"]


def component(key: str) -> str:
    """The pipeline component a part's key names (``unet_call`` -> ``unet``)."""
    return key.removesuffix("_call").removesuffix("_decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=["tiny", "testbed", "sd15", *FULL_ARCHITECTURES])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default 1024 for sdxl and sd3, 512 otherwise; "
                             "0: the architecture's own)")
    parser.add_argument("--no-cfg", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak of the accelerator")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = DEFAULT_SIDE.get(args.arch, 512) if args.size is None else args.size
    result = count(args.arch, args.steps, size or None, cfg=not args.no_cfg)
    result["peak_tflops"] = args.peak_tflops
    result["roofline_images_per_s"] = roofline(result, args.peak_tflops)
    print(f"{args.arch} at {result['image_side']}², {args.steps} steps, CFG {'on' if result['cfg'] else 'off'} "
          f"({result['denoiser_params'] / 1e6:.0f}M {result['denoiser']} parameters)")
    print("| part | GFLOP | per image |")
    print("|---|---|---|")
    for label, flops, times in result["rows"]:
        print(f"| {label} | {flops / 1e9:.1f} | x {times} |")
    print(f"total {result['tflop_per_image']:.2f} TFLOP per image; at {args.peak_tflops:.0f} TFLOP/s: "
          f"{result['roofline_images_per_s']:.2f} images/s")
    print(f"per step ({result['denoiser']} call): {result['tflop_per_step']:.3f} TFLOP; parameters: "
          + ", ".join(f"{component(k)} {n / 1e6:.0f}M" for k, n in result["params"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
