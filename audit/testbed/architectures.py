"""Stable Diffusion pipelines built from configs: a tiny one for tests and the default audit, and
the full SD1.5 architecture (random weights, same speed as the real one) for benchmarks.

Both are real ``StableDiffusionPipeline`` objects (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIP tokenizer, PNDM scheduler), saved with ``save_pretrained`` as safetensors, so
loading them exercises exactly the code path of a downloaded Stable Diffusion checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.testbed.tokenizer import clip_tokenizer

# Stable Diffusion 1.x noise schedule (scheduler_config.json of the released checkpoints).
SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class Architecture:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULE))


TINY = Architecture(
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    text={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
)

# The trained testbed: TINY's VAE and text encoder, a UNet with three levels (16, 8, 4 latent
# pixels) and cross-attention at the lower two: 1.7M parameters, ~0.4 s per batch-32 training
# step on two CPU cores.
TESTBED = Architecture(
    unet={
        **TINY.unet,
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    },
    vae=TINY.vae,
    text=TINY.text,
)

SD15 = Architecture(
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": 512,
    },
    text={
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
)

ARCHITECTURES = {"tiny": TINY, "testbed": TESTBED, "sd15": SD15}


def build_pipeline(arch: Architecture, seed: int = 0):  # -> StableDiffusionPipeline
    """A StableDiffusionPipeline with freshly initialised (seeded) weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **arch.text)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**arch.vae),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**arch.unet),
        scheduler=PNDMScheduler(**arch.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Any, folder: Path) -> Path:
    """``save_pretrained`` as safetensors."""
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
