"""Training the testbed: a tiny text-conditional latent diffusion model that memorizes its
duplicated training pairs.

The pipeline is a real ``StableDiffusionPipeline``: a small AutoencoderKL and a small
UNet2DConditionModel are trained here (the VAE first, then the UNet on frozen latents), next to a
small frozen CLIP text encoder (seeded random weights: no pretrained one can be downloaded) and
CLIP's own tokenizer. The UNet is trained as Stable Diffusion was: epsilon prediction under SD's
noise schedule, 10% caption dropout so classifier-free guidance works, an EMA of the weights.
The sampling scheduler saved with the pipeline is part of the spec (PNDM for the glyph testbed,
DDIM for the maps testbed), so the two testbeds also differ in how they are sampled.
Everything is seeded; on one machine a re-run gives the same figures.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from audit.progress import Progress
from audit.testbed.architectures import SD_SCHEDULE, TESTBED
from audit.testbed.dataset import DatasetSpec, TestbedItem, build_dataset, dataset_spec, training_entries
from audit.testbed.tokenizer import clip_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines the trained testbed."""

    seed: int = 0
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    vae_steps: int = 800
    vae_lr: float = 1e-3
    unet_steps: int = 4000
    unet_lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    kl_weight: float = 1e-6
    scheduler: str = "pndm"  # the sampling scheduler saved with the pipeline: one of SCHEDULERS

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown testbed scheduler {self.scheduler!r}; one of {', '.join(SCHEDULERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCHEDULERS = ("pndm", "ddim")


def sampling_scheduler(name: str) -> Any:
    """The diffusers scheduler saved with the pipeline, on Stable Diffusion 1's noise schedule:
    ``pndm`` as SD1 shipped it, ``ddim`` configured as SD1's DDIM (no final alpha of one, steps
    offset by one, no sample clipping)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler(**SD_SCHEDULE)
    if name == "ddim":
        keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")
        return DDIMScheduler(**{k: SD_SCHEDULE[k] for k in keys}, set_alpha_to_one=False, steps_offset=1,
                             clip_sample=False)
    raise ValueError(f"unknown testbed scheduler {name!r}; one of {', '.join(SCHEDULERS)}")


def train_spec(kind: str = "glyphs", seed: int = 0, **overrides: Any) -> TrainSpec:
    """The spec a testbed kind is trained with: its dataset, and DDIM sampling for ``maps`` (a
    second noise scheduler, so nothing gets tuned to PNDM's samples)."""
    scheduler = "ddim" if kind == "maps" else "pndm"
    return TrainSpec(seed=seed, dataset=dataset_spec(kind), scheduler=scheduler, **overrides)


@dataclass
class TrainResult:
    """The trained components and what happened while training them."""

    pipeline: Any  # StableDiffusionPipeline, float32, EMA weights
    items: list[TestbedItem]
    log: dict[str, Any]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(
    images: np.ndarray, spec: TrainSpec, generator: torch.Generator, device: str = "cpu"
) -> tuple[Any, list[float]]:
    """Train the autoencoder on the unique training images (MSE + a small KL term). Random draws
    come from ``generator`` on the CPU, so the data order does not depend on the device."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**TESTBED.vae).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, spec.vae_steps, spec.warmup_steps)
    )
    data = _to_tensor(images).to(device)
    losses: list[float] = []
    vae.train()
    with Progress("VAE training", "step", spec.vae_steps) as progress:
        for step in range(spec.vae_steps):
            batch = data[torch.randint(len(data), (spec.batch_size,), generator=generator).to(device)]
            posterior = vae.encode(batch).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents = posterior.mean + posterior.std * eps
            reconstruction = vae.decode(latents).sample
            loss = F.mse_loss(reconstruction, batch) + spec.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == spec.vae_steps - 1:
                log.info("vae step %d/%d loss %.5f", step, spec.vae_steps, loss.item())
            progress.update(1)
    vae.eval().requires_grad_(False)
    return vae, losses


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for shadow, param in zip(ema.parameters(), model.parameters()):
            shadow.lerp_(param, 1.0 - decay)


class EpochBatches:
    """The next ``batch_size`` entries of a shuffled epoch, reshuffled (from ``generator``) when
    the epoch cannot fill a batch; duplicated pairs occur once per copy."""

    def __init__(self, entries: list[int], batch_size: int, generator: torch.Generator) -> None:
        self.order, self.batch_size, self.generator = torch.tensor(entries), batch_size, generator
        self.epoch, self.position = self.order, len(self.order)

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.epoch):
            self.epoch, self.position = self.order[torch.randperm(len(self.order), generator=self.generator)], 0
        rows = self.epoch[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return rows


def epsilon_loss(unet: Any, noise_schedule: Any, latents: torch.Tensor, embeddings: torch.Tensor,
                 uncond: torch.Tensor, rows: torch.Tensor, caption_dropout: float, generator: torch.Generator,
                 device: str) -> torch.Tensor:
    """Stable Diffusion's training loss on one batch: captions dropped to the empty prompt with
    probability ``caption_dropout`` (so classifier-free guidance works), noise and timesteps drawn
    from ``generator`` on the CPU, the MSE of the UNet's ε-prediction."""
    x0 = latents[rows].to(device)
    cond = embeddings[rows].clone().to(device)
    dropped = (torch.rand(len(rows), generator=generator) < caption_dropout).to(device)
    cond[dropped] = uncond.to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(rows),), generator=generator).to(device)
    prediction = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
    return F.mse_loss(prediction, noise)


def train_unet(
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    uncond: torch.Tensor,
    entries: list[int],
    spec: TrainSpec,
    generator: torch.Generator,
    device: str = "cpu",
) -> tuple[Any, list[float]]:
    """Epsilon-prediction training; each step draws the next ``batch_size`` entries of a shuffled
    epoch (duplicated pairs occur once per copy). Returns the EMA model."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    noise_schedule = DDPMScheduler(
        num_train_timesteps=SD_SCHEDULE["num_train_timesteps"],
        beta_start=SD_SCHEDULE["beta_start"],
        beta_end=SD_SCHEDULE["beta_end"],
        beta_schedule=SD_SCHEDULE["beta_schedule"],
    )
    unet = UNet2DConditionModel(**TESTBED.unet).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=spec.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, spec.unet_steps, spec.warmup_steps)
    )
    batches = EpochBatches(entries, spec.batch_size, generator)
    losses: list[float] = []
    unet.train()
    with Progress("UNet training", "step", spec.unet_steps) as progress:
        for step in range(spec.unet_steps):
            loss = epsilon_loss(unet, noise_schedule, latents, embeddings, uncond, batches.next(),
                                spec.caption_dropout, generator, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            _ema_update(ema, unet, min(spec.ema_decay, (1 + step) / (10 + step)))
            losses.append(loss.item())
            if step % 100 == 0 or step == spec.unet_steps - 1:
                log.info("unet step %d/%d loss %.5f (mean of last 100: %.5f)", step, spec.unet_steps,
                         loss.item(), float(np.mean(losses[-100:])))
            progress.update(1)
    return ema.eval(), losses


def train_testbed(spec: TrainSpec, device: str = "cpu") -> TrainResult:
    """Build the dataset, train VAE then UNet on ``device``, and assemble the pipeline (float32,
    on the CPU). A GPU trains faster; its figures match the CPU's within tolerance, not bitwise."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    started = time.time()
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    items = build_dataset(spec.dataset, spec.seed)
    train_items = [item for item in items if item.duplicates > 0]
    vae, vae_losses = train_vae(np.stack([item.image for item in train_items]), spec, generator, device)
    with torch.no_grad():
        images = _to_tensor(np.stack([item.image for item in items])).to(device)
        posterior = vae.encode(images).latent_dist
        scaling = 1.0 / float(posterior.mean[[i.index for i in train_items]].std())
        vae.register_to_config(scaling_factor=scaling)
        latents = (posterior.mean * scaling).cpu()
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **TESTBED.text)
    ).eval().requires_grad_(False)
    with torch.no_grad():
        tokens = tokenizer([item.caption for item in items] + [""], padding="max_length",
                           max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(tokens)[0]
    unet, unet_losses = train_unet(
        latents, hidden[:-1], hidden[-1], training_entries(items), spec, generator, device
    )
    pipeline = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.cpu(),
        scheduler=sampling_scheduler(spec.scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return TrainResult(pipeline, items, {
        "spec": spec.to_dict(),
        "seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "vae_scaling_factor": scaling,
        "vae_loss_last100": float(np.mean(vae_losses[-100:])),
        "unet_loss_first100": float(np.mean(unet_losses[:100])),
        "unet_loss_last100": float(np.mean(unet_losses[-100:])),
        "vae_loss_curve": [float(np.mean(vae_losses[i : i + 100])) for i in range(0, len(vae_losses), 100)],
        "unet_loss_curve": [float(np.mean(unet_losses[i : i + 100])) for i in range(0, len(unet_losses), 100)],
    })


def spec_from_dict(data: dict[str, Any]) -> TrainSpec:
    """Inverse of ``TrainSpec.to_dict`` (JSON turns the duplication counts into strings). Specs
    recorded before the maps testbed have no ``kind`` or ``scheduler``: the defaults are theirs."""
    dataset = dict(data["dataset"])
    dataset["duplicate_groups"] = {int(k): int(v) for k, v in dataset["duplicate_groups"].items()}
    return TrainSpec(**{**data, "dataset": DatasetSpec(**dataset)})


def save_testbed(result: TrainResult, folder: Path) -> Path:
    """``save_pretrained`` with float16 safetensors (half the bytes; loads as any dtype)."""
    result.pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    result.pipeline.to(torch.float32)
    return folder
