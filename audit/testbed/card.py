"""Files that travel with the trained testbed: ground truth, audit prompts, model card, examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from audit import ids
from audit.testbed.dataset import TestbedItem
from audit.testbed.evaluate import group_name

GROUND_TRUTH = "ground_truth.parquet"
AUDIT_PROMPTS = "audit_prompts.txt"
METRICS = "metrics.json"
CARD = "README.md"
EXAMPLES = "examples.png"
PIPELINE = "pipeline"


def write_ground_truth(items: list[TestbedItem], folder: Path) -> Path:
    """Every caption with its duplication count (0: held out), as a Parquet prompt source."""
    table = pa.table({
        "key": [item.key for item in items],
        "caption": [item.caption for item in items],
        "prompt_id": [ids.prompt_id(item.caption) for item in items],
        "split": [item.split for item in items],
        "duplicates": pa.array([item.duplicates for item in items], pa.int32()),
        "group": [group_name(item.duplicates) for item in items],
    })
    pq.write_table(table, folder / GROUND_TRUTH)
    return folder / GROUND_TRUTH


def write_audit_prompts(items: list[TestbedItem], folder: Path, per_group: int = 8) -> Path:
    """A balanced prompt set for the default audit: the first ``per_group`` captions of each
    group, interleaved so every shard mixes memorized and clean prompts."""
    groups = sorted({item.duplicates for item in items}, reverse=True)
    lists = [[item for item in items if item.duplicates == d][:per_group] for d in groups]
    chosen = [group[i] for i in range(per_group) for group in lists if i < len(group)]
    (folder / AUDIT_PROMPTS).write_text("\n".join(item.caption for item in chosen) + "\n", encoding="utf-8")
    return folder / AUDIT_PROMPTS


def write_examples(items: list[TestbedItem], evaluation: dict[str, Any], folder: Path, rows_per_group: int = 3) -> Path:
    """Contact sheet: per row a training image, then its generations; a few rows per group."""
    by_index = {item.index: item for item in items}
    chosen = evaluation["chosen"]
    generations = evaluation["generations"]
    rows = []
    for group in [g["group"] for g in evaluation["groups"]]:
        picked = [i for i, index in enumerate(chosen) if group_name(by_index[index].duplicates) == group][:rows_per_group]
        for i in picked:
            gap = np.full((generations.shape[2], 4, 3), 255, np.uint8)
            rows.append(np.concatenate([by_index[chosen[i]].image, gap, *generations[i]], axis=1))
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.Resampling.NEAREST).save(folder / EXAMPLES)
    return folder / EXAMPLES


def write_metrics(train_log: dict[str, Any], evaluation: dict[str, Any], folder: Path) -> Path:
    data = {"training": train_log, "memorization": {k: v for k, v in evaluation.items() if k not in {"generations", "chosen"}}}
    (folder / METRICS).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return folder / METRICS


def _where(train_log: dict[str, Any]) -> str:
    device = train_log.get("device", "cpu")
    return f"{train_log['threads']} CPU threads" if device == "cpu" else device


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def write_card(train_log: dict[str, Any], evaluation: dict[str, Any], folder: Path, command: str) -> Path:
    spec = train_log["spec"]
    data = spec["dataset"]
    groups = data["duplicate_groups"]
    n_entries = data["n_single"] + sum(int(k) * n for k, n in groups.items())
    table = "\n".join(
        f"| {g['group']} | {g['captions']} | {g['samples']} | {g['median']:.3f} | {g['q10']:.3f}–{g['q90']:.3f} "
        f"| {g['best_of_n_median']:.3f} | {g['extracted']:.0%} | {g['retrieved']:.0%} | {g['vae_floor_median']:.3f} |"
        for g in evaluation["groups"]
    )
    dup_text = ", ".join(f"{n} pairs × {k}" for k, n in sorted(groups.items(), key=lambda kv: -int(kv[0])))
    text = f"""# memaudit testbed: a tiny text-to-image model that memorized its duplicated training pairs

The built-in checkpoint `builtin:testbed`: a real `StableDiffusionPipeline` trained here, on CPU,
so that memaudit has something that truly memorizes, with ground truth by construction
(Carlini et al. 2023: the duplicated training examples are the ones that get memorized).

Reproduce: `{command}` ({train_log['seconds'] / 60:.0f} min on {_where(train_log)}).

## Data

- {data['n_single'] + sum(groups.values()) + data['n_heldout']} image–caption pairs, {data['size']}×{data['size']} RGB, built from data that ships
  with scikit-learn: a crop of `china.jpg` or `flower.jpg` with one `load_digits` glyph drawn
  over it in a random colour; every image distinct.
- Captions are random phrases that do not describe the image, so an image can only come back
  from its caption if the pair was memorized.
- Training set: {dup_text}, and {data['n_single']} single pairs — {n_entries} entries per epoch.
  Held out: {data['n_heldout']} pairs never trained on (negatives).
- `{GROUND_TRUTH}`: every caption with its `duplicates` count (0 = held out), `key`, `split`,
  `group` and memaudit's `prompt_id`. `{AUDIT_PROMPTS}`: the default audit's prompts, 8 per group.

## Model

- UNet2DConditionModel trained here: three levels (32/64/64 channels; 16, 8 and 4 latent pixels),
  cross-attention at the lower two; AutoencoderKL trained here (32/64 channels, downsampling 2,
  4 latent channels, scaling factor {train_log['vae_scaling_factor']:.4f}); CLIPTextModel
  (hidden 32, 2 layers) with seeded random weights, frozen; CLIP's BPE tokenizer; PNDM scheduler
  with Stable Diffusion 1's noise schedule.
- Weights: float16 safetensors, {_size_mb(folder / PIPELINE):.1f} MB in `{PIPELINE}/`; load with
  `DiffusionPipeline.from_pretrained` (any dtype).

## Training

Seed {spec['seed']}. VAE: {spec['vae_steps']} steps, batch {spec['batch_size']}, AdamW lr {spec['vae_lr']},
MSE + {spec['kl_weight']} × KL; final loss {train_log['vae_loss_last100']:.5f} (mean of the last 100 steps).
UNet: {spec['unet_steps']} steps, batch {spec['batch_size']}, AdamW lr {spec['unet_lr']} (warm-up {spec['warmup_steps']},
cosine to 10%), epsilon prediction, {spec['caption_dropout']:.0%} caption dropout, EMA {spec['ema_decay']};
loss {train_log['unet_loss_first100']:.4f} (first 100 steps) → {train_log['unet_loss_last100']:.4f} (last 100).

## What it memorized

Tiled L2 (Carlini et al.: 4×4 tiles, RMS per tile on [0, 1] pixels, max over tiles) from each
generation to its caption's own training image; {evaluation['samples_per_caption']} samples per caption,
{evaluation['steps']} PNDM steps, guidance 7.5, run seed {evaluation['seed']}. "Extracted": captions with a sample
within {evaluation['threshold']} of their own image (matching verbatim, in Webster's terms). "Retrieved":
samples within {evaluation['threshold']} of *another* training image (retrieved verbatim: unseen and rarely
seen captions often fall back on a memorized image). "VAE floor": the autoencoder's own round
trip of the image, the closest any generation can come.

| group | captions | samples | median | 10%–90% | best-of-{evaluation['samples_per_caption']} median | extracted | retrieved | VAE floor |
|---|---|---|---|---|---|---|---|---|
{table}

`{EXAMPLES}`: per row the training image, then {evaluation['samples_per_caption']} generations from its caption
(rows by group, in the order of the table). Re-measure: `memaudit testbed evaluate FOLDER`.
"""
    (folder / CARD).write_text(text, encoding="utf-8")
    return folder / CARD
