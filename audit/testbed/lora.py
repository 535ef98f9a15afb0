"""A LoRA fine-tuning testbed: a small adapter on ``builtin:testbed`` that memorized its duplicated
fine-tuning pairs.

The highest memorization risk in practice is a small fine-tuning set (Somepalli et al. 2023): a
few dozen image-caption pairs, some repeated many times, trained on for hundreds of epochs. Here
a LoRA adapter (``peft``, added to the UNet the diffusers way: ``LoraConfig`` +
``unet.add_adapter``) is fine-tuned on such a set of the glyph kind, on top of the frozen trained
testbed ``builtin:testbed``: its VAE encodes the images (latents x its scaling factor), its frozen
text encoder the captions, and only the LoRA weights learn, by epsilon prediction under Stable
Diffusion's noise schedule (DDPMScheduler on ``SD_SCHEDULE``, as ``audit.testbed.train``) with 10%
caption dropout. The adapter is saved with diffusers' ``save_lora_weights`` (float16 safetensors,
``pytorch_lora_weights.safetensors``) and loads onto the base with ``pipe.load_lora_weights``.

The fine-tuning set is built by ``build_dataset`` from its own seed, and ``check_disjoint``
refuses one that shares a caption or an image with the base testbed's dataset (training and
held-out pairs alike): whatever base + adapter regenerates of it was learnt by the adapter.
Ground truth as for the other testbeds: the duplicated pairs are the memorized ones, held-out
pairs are never trained on. Everything is seeded; on one machine a re-run gives the same figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit.progress import Progress
from audit.similarity import tiled_l2
from audit.testbed.architectures import SD_SCHEDULE
from audit.testbed.checkpoints import LORA_BASE
from audit.testbed.dataset import DatasetSpec, TestbedItem, build_dataset, training_entries

log = logging.getLogger(__name__)

BASE_TESTBED = LORA_BASE  # the builtin name of the model the adapter is trained on and loads onto
ADAPTER_DIR = "adapter"  # the adapter's folder inside a packaged LoRA testbed
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name

FINETUNE_DATASET = DatasetSpec(n_single=96, duplicate_groups={16: 8, 4: 8}, n_heldout=16)
"""The fine-tuning set: 96 single pairs, 8 pairs repeated 16 times, 8 repeated 4 times (256 entries
per epoch), and 16 held-out pairs. 112 distinct training images: enough for the reference's
calibration (``memaudit reference testbed --testbed lora``), which needs 100."""

# Every linear layer of the UNet's transformer blocks (self- and cross-attention, feed-forward)
# and their 1x1 input/output projections: where the caption enters the UNet.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


@dataclass(frozen=True)
class LoraSpec:
    """Everything that determines the LoRA testbed: its fine-tuning set and how it is trained."""

    seed: int = 1  # the fine-tuning set's and the training's; the base testbed's dataset is seed 0
    dataset: DatasetSpec = field(default_factory=lambda: FINETUNE_DATASET)
    rank: int = 16
    alpha: int = 16
    target_modules: tuple[str, ...] = TARGET_MODULES
    steps: int = 1200
    lr: float = 5e-3
    batch_size: int = 32
    warmup_steps: int = 50
    caption_dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


def spec_from_dict(data: dict[str, Any]) -> LoraSpec:
    """Inverse of ``LoraSpec.to_dict`` (JSON turns the duplication counts into strings)."""
    dataset = dict(data["dataset"])
    dataset["duplicate_groups"] = {int(k): int(v) for k, v in dataset["duplicate_groups"].items()}
    return LoraSpec(**{**data, "dataset": DatasetSpec(**dataset),
                       "target_modules": tuple(data["target_modules"])})


def recorded_spec(folder: Path) -> LoraSpec:
    """The spec a packaged LoRA testbed was trained with (its ``metrics.json``)."""
    return spec_from_dict(json.loads((folder / "metrics.json").read_text())["training"]["spec"])


def finetune_items(spec: LoraSpec) -> list[TestbedItem]:
    """The fine-tuning set's pairs (duplication groups, singles, held out), from the spec's seed."""
    return build_dataset(spec.dataset, spec.seed)


def base_items(base_folder: Path) -> list[TestbedItem]:
    """The base testbed's whole dataset, rebuilt from the spec in its ``metrics.json``."""
    from audit.testbed.train import spec_from_dict as base_spec_from_dict

    spec = base_spec_from_dict(json.loads((base_folder / "metrics.json").read_text())["training"]["spec"])
    return build_dataset(spec.dataset, spec.seed)


def check_disjoint(items: list[TestbedItem], base: list[TestbedItem]) -> float:
    """Refuse a fine-tuning set that shares a caption or an image with the base dataset ``base``;
    returns the smallest tiled L2 between a fine-tuning image and a base image (for the record:
    above the extraction threshold, no base image passes for a fine-tuning one)."""
    shared = {item.caption for item in items} & {item.caption for item in base}
    if shared:
        raise ValueError(f"the fine-tuning set shares {len(shared)} captions with the base testbed's dataset, "
                         f"e.g. {sorted(shared)[0]!r}; choose another seed")
    base_bytes = {item.image.tobytes() for item in base}
    same = [item.key for item in items if item.image.tobytes() in base_bytes]
    if same:
        raise ValueError(f"the fine-tuning set shares {len(same)} images with the base testbed's dataset "
                         f"(e.g. item {same[0]}); choose another seed")
    ours = np.stack([item.image for item in items])
    theirs = np.stack([item.image for item in base])
    return float(min(tiled_l2(image[None], theirs).min() for image in ours))


@dataclass
class LoraResult:
    """The base pipeline with the trained adapter on its UNet, the pairs, and the training log."""

    pipeline: Any  # StableDiffusionPipeline, float32; its unet carries the peft adapter
    items: list[TestbedItem]
    log: dict[str, Any]


def load_base(base_folder: Path) -> Any:
    """The base testbed's ``StableDiffusionPipeline`` (from ``base_folder/pipeline``), float32."""
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(base_folder / "pipeline", torch_dtype=torch.float32)


def _encode(pipe: Any, items: list[TestbedItem]) -> tuple[Any, Any]:
    """Latents of every image (the VAE's posterior mean x its scaling factor, as the base was
    trained) and the frozen text encoder's hidden states of every caption, then of ""."""
    import torch

    from audit.testbed.train import _to_tensor

    with torch.no_grad():
        pixels = _to_tensor(np.stack([item.image for item in items]))
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        tokens = pipe.tokenizer([item.caption for item in items] + [""], padding="max_length",
                                max_length=pipe.tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
        hidden = pipe.text_encoder(tokens)[0]
    return latents, hidden


def add_lora(unet: Any, spec: LoraSpec) -> list[Any]:
    """Freeze ``unet`` and add the spec's LoRA adapter to it; returns the trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                                target_modules=list(spec.target_modules)))
    return [p for p in unet.parameters() if p.requires_grad]


def train_lora(spec: LoraSpec, base_folder: Path, device: str = "cpu") -> LoraResult:
    """Fine-tune a LoRA adapter of the base testbed in ``base_folder`` on the spec's fine-tuning set.

    Each step draws the next ``batch_size`` entries of a shuffled epoch (a duplicated pair occurs
    once per copy); only the LoRA weights are trained (AdamW, linear warm-up then cosine decay to
    10%, as the base was trained). Random draws come from one seeded generator on the CPU.
    """
    import torch
    from diffusers import DDPMScheduler

    from audit.testbed.train import EpochBatches, _lr_factor, epsilon_loss

    started = time.time()
    items = finetune_items(spec)
    closest_base = check_disjoint(items, base_items(base_folder))
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    pipe = load_base(base_folder)
    latents, hidden = _encode(pipe, items)
    embeddings, uncond = hidden[:-1], hidden[-1]
    unet = pipe.unet.to(device)
    params = add_lora(unet, spec)
    n_params = sum(p.numel() for p in params)
    noise_schedule = DDPMScheduler(**{k: SD_SCHEDULE[k] for k in
                                      ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, spec.steps, spec.warmup_steps))
    entries = training_entries(items)
    batches = EpochBatches(entries, spec.batch_size, generator)
    losses: list[float] = []
    log.info("LoRA: %d trainable parameters (rank %d) on %d entries per epoch", n_params, spec.rank, len(entries))
    unet.train()
    with Progress("LoRA training", "step", spec.steps) as progress:
        for step in range(spec.steps):
            loss = epsilon_loss(unet, noise_schedule, latents, embeddings, uncond, batches.next(),
                                spec.caption_dropout, generator, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == spec.steps - 1:
                log.info("lora step %d/%d loss %.5f (mean of last 100: %.5f)", step, spec.steps, loss.item(),
                         float(np.mean(losses[-100:])))
            progress.update(1)
    unet.eval().cpu()
    return LoraResult(pipe, items, {
        "spec": spec.to_dict(),
        "base": f"builtin:{BASE_TESTBED}",
        "seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "trainable_parameters": n_params,
        "entries_per_epoch": len(entries),
        "epochs": round(spec.steps * spec.batch_size / len(entries), 1),
        "closest_base_image": closest_base,
        "loss_first100": float(np.mean(losses[:100])),
        "loss_last100": float(np.mean(losses[-100:])),
        "loss_curve": [float(np.mean(losses[i : i + 100])) for i in range(0, len(losses), 100)],
    })


def save_adapter(result: LoraResult, folder: Path) -> Path:
    """Save the adapter as diffusers does (``save_lora_weights``), in float16 with its LoRA config
    as metadata; returns the safetensors file. ``pipe.load_lora_weights(folder)`` loads it."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = result.pipeline.unet
    layers = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    (folder / ADAPTER_FILE).chmod(0o644)  # written owner-only; a shipped file is read by everyone
    return folder / ADAPTER_FILE


def load_adapter(pipe: Any, adapter: Path) -> Any:
    """Load a LoRA adapter (its folder, or the safetensors file) onto ``pipe`` with diffusers'
    ``load_lora_weights``; returns ``pipe``."""
    adapter = Path(adapter)
    if adapter.is_file():
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    else:
        pipe.load_lora_weights(str(adapter), weight_name=ADAPTER_FILE)
    return pipe
