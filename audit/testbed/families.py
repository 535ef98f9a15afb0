"""Tiny pipelines of five more diffusers families, built from configs with seeded random weights.

Each family keeps the real checkpoints' layout (pipeline class, component classes, scheduler and
its settings, text encoders and how their widths feed the denoiser) at a width that runs a
two-step, two-prompt generation in seconds on a CPU:

- ``sd2``: ``StableDiffusionPipeline`` as SD 2.x: linear-projection UNet, gelu CLIP text encoder,
  ``EulerDiscreteScheduler`` predicting v.
- ``sdxl``: ``StableDiffusionXLPipeline``: two CLIP encoders (the second with a projection whose
  output is the pooled embedding), a ``text_time`` UNet, ``EulerDiscreteScheduler``.
- ``sd3``: ``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, two projected CLIP encoders and
  a T5 encoder, a 16-channel VAE with shift and scale, ``FlowMatchEulerDiscreteScheduler``.
- ``flux``: ``FluxPipeline``: ``FluxTransformer2DModel`` with guidance embedding (as Flux-dev),
  CLIP + T5, a 16-channel VAE without quant convs, flow matching with resolution-dependent shift.
- ``pixart``: ``PixArtAlphaPipeline``: ``PixArtTransformer2DModel`` with learned variance, T5,
  ``DPMSolverMultistepScheduler``.

The VAEs have two blocks (scale factor 2) and every denoiser's ``sample_size`` is 16, so the
default image is 32 px; Flux's pipeline has no sample size and defaults to 256 px here, so callers
pass ``height``/``width`` (multiples of 4: twice the VAE factor, for Flux's 2x2 latent packing).
Text encoders tokenize offline: CLIP with :func:`audit.testbed.tokenizer.clip_tokenizer` (hence the
CLIP vocabulary of 49408), T5 with :func:`audit.testbed.t5_tokenizer.t5_tokenizer`. Save with
:func:`audit.testbed.architectures.save_pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from audit.errors import InputError
from audit.testbed.architectures import SD_SCHEDULE, TINY
from audit.testbed.t5_tokenizer import t5_tokenizer, vocab_size

# The SD 1.x/2.x/XL noise schedule, without the PNDM-only keys of SD_SCHEDULE.
SD_BETAS = {key: SD_SCHEDULE[key] for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                              "steps_offset")}

# Text encoders. CLIP_L plays CLIP ViT-L (quick_gelu), CLIP_G OpenCLIP's larger gelu encoders.
CLIP_L: dict[str, Any] = {**TINY.text, "hidden_act": "quick_gelu"}
CLIP_G: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "projection_dim": 64, "hidden_act": "gelu"}
# T5 v1.1 layout (gated gelu, untied head); wide enough for SD3's two CLIP widths side by side.
T5: dict[str, Any] = {"d_model": 128, "d_kv": 16, "d_ff": 256, "num_layers": 2, "num_heads": 4,
                      "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
                      "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "dropout_rate": 0.0}

VAE_SD: dict[str, Any] = dict(TINY.vae)  # 4 latent channels, SD's scaling factor (the default)
VAE_16: dict[str, Any] = {**TINY.vae, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}

SD2: dict[str, dict[str, Any]] = {
    "unet": {**TINY.unet, "use_linear_projection": True},
    "vae": VAE_SD,
    "text_encoder": {**TINY.text, "hidden_act": "gelu"},
    "scheduler": {**SD_BETAS, "prediction_type": "v_prediction"},
}

SDXL_TIME_DIM = 8  # six size/crop numbers, each embedded in this many channels
SDXL: dict[str, dict[str, Any]] = {
    "unet": {
        **TINY.unet,
        # SDXL's first level has no attention.
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "use_linear_projection": True,
        "cross_attention_dim": CLIP_L["hidden_size"] + CLIP_G["hidden_size"],  # both encoders' states, concatenated
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_DIM,
        "projection_class_embeddings_input_dim": 6 * SDXL_TIME_DIM + CLIP_G["projection_dim"],
    },
    "vae": VAE_SD,
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G,
    "scheduler": {**SD_BETAS, "prediction_type": "epsilon", "timestep_spacing": "leading"},
}

SD3: dict[str, dict[str, Any]] = {
    "transformer": {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "caption_projection_dim": 32,  # the attention width, heads x head dim
        "joint_attention_dim": T5["d_model"],  # CLIP states are zero-padded to T5's width
        "pooled_projection_dim": CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
        "pos_embed_max_size": 32,  # in patches: up to 128 px
    },
    "vae": {**VAE_16, "shift_factor": 0.0609, "scaling_factor": 1.5305},
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G,
    "text_encoder_3": T5,
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
}

FLUX: dict[str, dict[str, Any]] = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 4 * VAE_16["latent_channels"],  # 2x2 latent patches packed into channels
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5["d_model"],
        "pooled_projection_dim": CLIP_L["hidden_size"],  # CLIPTextModel's pooled output
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),  # sums to the head dim
    },
    "vae": {**VAE_16, "shift_factor": 0.1159, "scaling_factor": 0.3611},
    "text_encoder": CLIP_L,
    "text_encoder_2": T5,
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}

PIXART: dict[str, dict[str, Any]] = {
    "transformer": {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": VAE_SD["latent_channels"],
        "out_channels": 2 * VAE_SD["latent_channels"],  # noise and learned variance
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "cross_attention_dim": 32,
        "caption_channels": T5["d_model"],
        "norm_type": "ada_norm_single",
        "num_embeds_ada_norm": 1000,
    },
    "vae": VAE_SD,
    "text_encoder": T5,
    "scheduler": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "algorithm_type": "dpmsolver++", "solver_order": 2,
                  "lower_order_final": True},
}

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {"sd2": SD2, "sdxl": SDXL, "sd3": SD3, "flux": FLUX, "pixart": PIXART}


def _clip(config: dict[str, Any], projection: bool):  # -> CLIPTextModel | CLIPTextModelWithProjection
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)
    return CLIPTextModelWithProjection(text_config) if projection else CLIPTextModel(text_config)


def _t5(config: dict[str, Any]):  # -> T5EncoderModel
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size(), is_encoder_decoder=False, use_cache=False, **config))


def build_sd2(seed: int = 0):  # -> StableDiffusionPipeline
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from audit.testbed.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD2["vae"]),
        text_encoder=_clip(SD2["text_encoder"], projection=False),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**SD2["unet"]),
        scheduler=EulerDiscreteScheduler(**SD2["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(seed: int = 0):  # -> StableDiffusionXLPipeline
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from audit.testbed.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL["vae"]),
        text_encoder=_clip(SDXL["text_encoder"], projection=False),
        text_encoder_2=_clip(SDXL["text_encoder_2"], projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=UNet2DConditionModel(**SDXL["unet"]),
        scheduler=EulerDiscreteScheduler(**SDXL["scheduler"]),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_sd3(seed: int = 0):  # -> StableDiffusion3Pipeline
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    from audit.testbed.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD3["transformer"]),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3["scheduler"]),
        vae=AutoencoderKL(**SD3["vae"]),
        text_encoder=_clip(SD3["text_encoder"], projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(SD3["text_encoder_2"], projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(SD3["text_encoder_3"]),
        tokenizer_3=t5_tokenizer(),
    )


def build_flux(seed: int = 0):  # -> FluxPipeline
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from audit.testbed.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX["scheduler"]),
        vae=AutoencoderKL(**FLUX["vae"]),
        text_encoder=_clip(FLUX["text_encoder"], projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(FLUX["text_encoder_2"]),
        tokenizer_2=t5_tokenizer(),
        transformer=FluxTransformer2DModel(**FLUX["transformer"]),
    )


def build_pixart(seed: int = 0):  # -> PixArtAlphaPipeline
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5(PIXART["text_encoder"]),
        vae=AutoencoderKL(**PIXART["vae"]),
        transformer=PixArtTransformer2DModel(**PIXART["transformer"]),
        scheduler=DPMSolverMultistepScheduler(**PIXART["scheduler"]),
    )


FAMILIES: dict[str, Callable[[int], Any]] = {
    "sd2": build_sd2,
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
    "pixart": build_pixart,
}


def build_family(name: str, seed: int = 0) -> Any:
    """The tiny pipeline of family ``name`` (a key of :data:`FAMILIES`) with weights seeded by ``seed``."""
    if name not in FAMILIES:
        raise InputError(f"unknown pipeline family {name!r}; available: {', '.join(FAMILIES)}")
    return FAMILIES[name](seed)
