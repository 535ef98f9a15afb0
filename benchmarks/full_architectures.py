"""Full-size SDXL base 1.0 and SD3-medium architectures: the released models' shapes, random weights.

Companion of ``audit/testbed/architectures.py`` (which holds SD1.5 and the tiny testbeds) for the
benchmarks: ``benchmarks/flops.py`` builds these on the ``meta`` device to count FLOPs, and
``benchmarks/generation.py --arch sdxl`` builds a real ``StableDiffusionXLPipeline`` with random
weights to time generation at the speed of the released model (speed depends on shapes only).

Every size below is a fact of the released checkpoints' configs, as published on their model
cards / in their Hugging Face model repositories (nothing is downloaded here):

- SDXL base 1.0 (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image
  Synthesis", 2023; model repository ``stabilityai/stable-diffusion-xl-base-1.0``): a 2.6B-parameter
  UNet with three levels and 1/2/10 transformer blocks, two CLIP text encoders (OpenAI CLIP ViT-L/14
  and OpenCLIP ViT-bigG/14) whose penultimate hidden states are concatenated (768 + 1280 = 2048
  context channels), and the SD VAE (4 latent channels, 8x downsampling); 1024² images.
- SD3 medium (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
  Synthesis", 2024; model repository ``stabilityai/stable-diffusion-3-medium-diffusers``): a 2B
  MMDiT (24 joint blocks of 24 heads x 64), a 16-channel VAE, and three text encoders: CLIP-L,
  CLIP-G and T5 v1.1 XXL's encoder (256 tokens); 1024² images.

``SDXL_TINY`` keeps SDXL's pipeline class and every component kind at CPU-sized widths, so the
SDXL code path (two encoders, added text/time conditions) runs in seconds in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from audit.testbed.architectures import TINY
from audit.testbed.families import SD_BETAS
from audit.testbed.tokenizer import clip_tokenizer

CLIP_VOCAB = 49408  # CLIP's BPE vocabulary (audit/testbed/tokenizer.py), shared by CLIP-L and CLIP-G
CLIP_TOKENS = 77  # CLIP's context length
# SDXL's micro-conditioning (SDXL paper, section 2.2): original size, crop top-left, target size
SDXL_TIME_IDS = 6

# scheduler_config.json of SDXL base 1.0: Euler with SD's scaled-linear betas, "leading" spacing.
SDXL_SCHEDULE: dict[str, Any] = {
    **SD_BETAS,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# scheduler_config.json of SD3 medium: rectified-flow Euler, timestep shift 3 (the SD3 paper's
# resolution-dependent shift).
SD3_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# OpenAI CLIP ViT-L/14's text tower (text_encoder of SDXL and SD3; the same as SD1.5's).
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# OpenCLIP ViT-bigG/14's text tower (text_encoder_2 of SDXL and SD3): 32 layers of width 1280 with
# exact GELU, and a 1280-wide text projection whose pooled output conditions the denoiser.
CLIP_BIG_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

# The Stable Diffusion VAE's shape (4 levels of 128/256/512/512 channels, 8x downsampling).
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "force_upcast": True,
}


@dataclass(frozen=True)
class SDXLArchitecture:
    """The components of a ``StableDiffusionXLPipeline``, as constructor keyword arguments."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]  # text_encoder: CLIPTextModel (penultimate hidden states)
    text_2: dict[str, Any]  # text_encoder_2: CLIPTextModelWithProjection (hidden states and pooled)
    scheduler: dict[str, Any]


@dataclass(frozen=True)
class SD3Architecture:
    """The components of a ``StableDiffusion3Pipeline``, as constructor keyword arguments."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]  # text_encoder: CLIP-L with projection
    text_2: dict[str, Any]  # text_encoder_2: CLIP-G with projection
    text_3: dict[str, Any]  # text_encoder_3: T5EncoderModel
    scheduler: dict[str, Any]
    t5_tokens: int = 256  # the SD3 pipeline's default max_sequence_length for T5


SDXL_BASE = SDXLArchitecture(
    unet={
        "sample_size": 128,  # 1024² images
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        # diffusers' historical name: these are head counts (5, 10, 20 heads of 64 channels)
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": CLIP_L["hidden_size"] + CLIP_BIG_G["hidden_size"],  # 2048
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        # 6 Fourier-embedded size/crop numbers x 256 + CLIP-G's 1280-wide pooled projection = 2816
        "projection_class_embeddings_input_dim": SDXL_TIME_IDS * 256 + CLIP_BIG_G["projection_dim"],
    },
    vae={**_SD_VAE, "latent_channels": 4, "scaling_factor": 0.13025},
    text=CLIP_L,
    text_2=CLIP_BIG_G,
    scheduler=SDXL_SCHEDULE,
)

_TINY_TEXT_2 = {**TINY.text, "hidden_act": "gelu"}
_TINY_TIME_DIM = 8

# SDXL's structure (two encoders, text_time conditioning, a plain top level and a deeper
# transformer stack below) at the widths of audit/testbed/architectures.py's TINY: 32² images.
SDXL_TINY = SDXLArchitecture(
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "cross_attention_dim": TINY.text["hidden_size"] + _TINY_TEXT_2["hidden_size"],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TINY_TIME_DIM,
        "projection_class_embeddings_input_dim": SDXL_TIME_IDS * _TINY_TIME_DIM + _TINY_TEXT_2["projection_dim"],
        "norm_num_groups": 8,
    },
    vae=TINY.vae,
    text=TINY.text,
    text_2=_TINY_TEXT_2,
    scheduler=SDXL_SCHEDULE,
)

SD3_MEDIUM = SD3Architecture(
    transformer={
        "sample_size": 128,  # 1024² images
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,  # 24 x 64 = 1536 channels
        "joint_attention_dim": 4096,  # T5-XXL's width; the CLIP states are zero-padded to it
        "caption_projection_dim": 1536,
        "pooled_projection_dim": CLIP_L["projection_dim"] + CLIP_BIG_G["projection_dim"],  # 2048
        "pos_embed_max_size": 192,
    },
    vae={**_SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
         "use_quant_conv": False, "use_post_quant_conv": False},
    text=CLIP_L,
    text_2=CLIP_BIG_G,
    # T5 v1.1 XXL (Raffel et al. 2020; the v1.1 release): gated-GELU feed-forward, no tied embeddings
    text_3={
        "vocab_size": 32128,
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "tie_word_embeddings": False,
    },
    scheduler=SD3_SCHEDULE,
)

FULL_ARCHITECTURES: dict[str, SDXLArchitecture | SD3Architecture] = {
    "sdxl": SDXL_BASE,
    "sdxl-tiny": SDXL_TINY,
    "sd3": SD3_MEDIUM,
}


def clip_text_config(fields: dict[str, Any]) -> Any:  # -> transformers.CLIPTextConfig
    """A CLIP text-tower config with CLIP's vocabulary and 77 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_TOKENS, **fields)


def t5_config(fields: dict[str, Any]) -> Any:  # -> transformers.T5Config
    """A T5 encoder config."""
    from transformers import T5Config

    return T5Config(**fields)


def build_sdxl_pipeline(arch: SDXLArchitecture, seed: int = 0, device: str | None = None) -> Any:
    """A ``StableDiffusionXLPipeline`` with freshly initialised (seeded) weights, built on
    ``device`` (default CPU; building the full UNet on a GPU takes seconds instead of a minute).

    Both encoders use CLIP's tokenizer (one BPE vocabulary); the second pads with "!" (token 0),
    as OpenCLIP does and the released ``tokenizer_2`` is configured to."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        vae = AutoencoderKL(**arch.vae)
        text_encoder = CLIPTextModel(clip_text_config(arch.text))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(arch.text_2))
        unet = UNet2DConditionModel(**arch.unet)
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**arch.scheduler),
        force_zeros_for_empty_prompt=True,  # as released: an empty negative prompt is a zero embedding
        add_watermarker=False,
    )


__all__ = ["FULL_ARCHITECTURES", "SD3Architecture", "SD3_MEDIUM", "SDXLArchitecture", "SDXL_BASE",
           "SDXL_TINY", "build_sdxl_pipeline", "clip_text_config", "t5_config"]
