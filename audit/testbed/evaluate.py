"""How much the testbed memorized: generations for a caption vs that caption's own image.

For each ground-truth group (duplicated k times, single copy, held out) some captions are
generated ``samples_per_caption`` times with memaudit's own generation stage, and every sample is
compared with the caption's training image by Carlini et al.'s tiled L2. Duplicated captions
should regenerate their image (small distances); held-out captions cannot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit import ids
from audit.batching import run_batches
from audit.config import load_config
from audit.generate.png import decode_png
from audit.generate.sampling import GenerateStage
from audit.plan import ShardSpec, shard_samples
from audit.similarity import tiled_l2
from audit.testbed.dataset import TestbedItem

EXTRACTION_THRESHOLD = 0.15  # Carlini et al.: a generation this close to a training image is a copy


def group_name(duplicates: int) -> str:
    return "heldout" if duplicates == 0 else ("single" if duplicates == 1 else f"dup{duplicates}")


@dataclass(frozen=True)
class GroupFigures:
    """Tiled-L2 distances of one ground-truth group's generations to their own images."""

    group: str
    duplicates: int
    captions: int
    samples: int
    median: float  # over all samples
    q10: float
    q90: float
    best_of_n_median: float  # per caption, the closest of its samples; median over captions
    extracted: float  # fraction of captions with a sample within EXTRACTION_THRESHOLD
    retrieved: float  # fraction of samples within EXTRACTION_THRESHOLD of another training image
    vae_floor_median: float  # the VAE round trip of the image itself: the best any sample can do


def generate_for(folder: Path, items: list[TestbedItem], samples_per_caption: int, steps: int,
                 seed: int = 0, batch_size: int = 8, adapter: Path | None = None) -> np.ndarray:
    """``(len(items), samples_per_caption, H, W, 3)`` uint8 generations, made by GenerateStage;
    with ``adapter`` (a LoRA folder or safetensors file), by the pipeline with that adapter loaded
    as an audit loads it (``model.lora``)."""
    cfg = load_config(None, [
        f"model.path={folder}", f"generation.steps={steps}", f"compute.batch_size={batch_size}",
        f"run.seed={seed}", "generation.thumbnail_size=0",
        *([f"model.lora={json.dumps([{'path': str(adapter)}])}"] if adapter is not None else []),
    ])
    stage = GenerateStage(cfg, "cpu", "float32")
    shard = ShardSpec(
        0, "evaluation", tuple(ids.prompt_id(i.caption) for i in items),
        tuple(ids.normalize_prompt(i.caption) for i in items),
    )
    rows = shard_samples(shard, samples_per_caption, seed)
    outputs: list[dict[str, np.ndarray]] = []
    run_batches(stage, rows, outputs.append, batch_size)
    errors = [e for out in outputs for e in out["error"] if e]
    if errors:
        raise RuntimeError(f"{len(errors)} evaluation samples failed, e.g. {errors[0]}")
    pixels = np.stack([decode_png(png) for out in outputs for png in out["image_png"]])
    return pixels.reshape(len(items), samples_per_caption, *pixels.shape[1:])


def vae_round_trip(folder: Path, images: np.ndarray) -> np.ndarray:
    """The saved VAE's encode-decode of ``images`` (uint8 NHWC): the closest any generation
    can come to a training image."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _distance_to_other_training_images(
    generations: np.ndarray, chosen: list[TestbedItem], items: list[TestbedItem]
) -> np.ndarray:
    """(captions, samples): tiled L2 to the closest training image other than the caption's own
    (Webster's "retrieved verbatim" when small)."""
    train = [item for item in items if item.duplicates > 0]
    images = np.stack([item.image for item in train])
    indices = np.array([item.index for item in train])
    out = np.empty(generations.shape[:2], dtype=np.float32)
    for i, item in enumerate(chosen):
        d = tiled_l2(generations[i][:, None], images[None])  # (samples, train)
        d[:, indices == item.index] = np.inf
        out[i] = d.min(axis=1)
    return out


def evaluate_memorization(
    folder: Path,
    items: list[TestbedItem],
    captions_per_group: int = 16,
    samples_per_caption: int = 4,
    steps: int = 20,
    seed: int = 0,
    adapter: Path | None = None,
) -> dict[str, Any]:
    """Figures per group, plus every distance (for plots and tolerance checks); ``adapter``: a LoRA
    adapter loaded onto the pipeline in ``folder`` for the generations (see ``generate_for``)."""
    chosen: list[TestbedItem] = []
    for duplicates in sorted({item.duplicates for item in items}, reverse=True):
        chosen += [item for item in items if item.duplicates == duplicates][:captions_per_group]
    generations = generate_for(folder, chosen, samples_per_caption, steps, seed, adapter=adapter)
    own = np.stack([item.image for item in chosen])[:, None]
    floors = tiled_l2(vae_round_trip(folder, own[:, 0]), own[:, 0])
    others = _distance_to_other_training_images(generations, chosen, items)
    distances = tiled_l2(generations, own)  # (captions, samples)
    groups = []
    for duplicates in sorted({item.duplicates for item in chosen}, reverse=True):
        mask = np.array([item.duplicates == duplicates for item in chosen])
        d = distances[mask]
        best = d.min(axis=1)
        groups.append(GroupFigures(
            group=group_name(duplicates), duplicates=duplicates, captions=int(mask.sum()), samples=int(d.size),
            median=float(np.median(d)), q10=float(np.quantile(d, 0.1)), q90=float(np.quantile(d, 0.9)),
            best_of_n_median=float(np.median(best)), extracted=float(np.mean(best < EXTRACTION_THRESHOLD)),
            retrieved=float(np.mean(others[mask] < EXTRACTION_THRESHOLD)),
            vae_floor_median=float(np.median(floors[mask])),
        ))
    return {
        "threshold": EXTRACTION_THRESHOLD,
        "samples_per_caption": samples_per_caption,
        "steps": steps,
        "seed": seed,
        "groups": [asdict(g) for g in groups],
        "distances": {
            group_name(d): distances[np.array([i.duplicates == d for i in chosen])].round(5).tolist()
            for d in sorted({i.duplicates for i in chosen}, reverse=True)
        },
        "generations": generations,
        "chosen": [item.index for item in chosen],
    }
