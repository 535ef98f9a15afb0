"""Files that travel with a trained testbed: ground truth, audit prompts, model card, examples.

The card is rendered from the recorded training spec, so it says which kind of testbed it
describes (``glyphs``: ``builtin:testbed``; ``maps``: ``builtin:testbed-maps``), what the kind is
built from and which scheduler samples it; specs recorded before the kinds existed are glyphs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from audit import ids
from audit.testbed.checkpoints import SHIPPED_KINDS
from audit.testbed.dataset import FLAT_SHARE, MAX_CROP_DETAIL, MIN_DISTANCE, TestbedItem
from audit.testbed.evaluate import group_name

GROUND_TRUTH = "ground_truth.parquet"
AUDIT_PROMPTS = "audit_prompts.txt"
METRICS = "metrics.json"
CARD = "README.md"
EXAMPLES = "examples.png"
PIPELINE = "pipeline"
BUILTIN_NAMES = {kind: f"builtin:{name}" for kind, name in SHIPPED_KINDS.items()}
SCHEDULER_NAMES = {"pndm": "PNDM", "ddim": "DDIM"}


def _kind(spec: dict[str, Any]) -> str:
    """The dataset kind of a recorded spec (absent: recorded before kinds existed, so glyphs)."""
    return str(spec["dataset"].get("kind", "glyphs"))


def _scheduler(spec: dict[str, Any]) -> str:
    """The sampling scheduler's display name of a recorded spec (absent: PNDM)."""
    return SCHEDULER_NAMES[str(spec.get("scheduler", "pndm"))]


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
    """Record the training log and the memorization figures (without the generated pixels) as
    ``metrics.json``: the card is rendered from them and tests compare against them."""
    data = {"training": train_log, "memorization": {k: v for k, v in evaluation.items() if k not in {"generations", "chosen"}}}
    (folder / METRICS).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return folder / METRICS


def _where(train_log: dict[str, Any]) -> str:
    """Where training ran, for the card: the CPU thread count, or the device it names."""
    device = train_log.get("device", "cpu")
    threads = train_log["threads"]
    return f"{threads} CPU thread{'' if threads == 1 else 's'}" if device == "cpu" else device


def _size_mb(folder: Path) -> float:
    """Total size of the files under ``folder`` in MiB (the card reports the weights' size)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _results_table(evaluation: dict[str, Any]) -> str:
    """The body rows of the memorization table, one per group, in the evaluation's order."""
    return "\n".join(
        f"| {g['group']} | {g['captions']} | {g['samples']} | {g['median']:.3f} | {g['q10']:.3f}–{g['q90']:.3f} "
        f"| {g['best_of_n_median']:.3f} | {g['extracted']:.0%} | {g['retrieved']:.0%} | {g['vae_floor_median']:.3f} |"
        for g in evaluation["groups"]
    )


def _intro_section(train_log: dict[str, Any], command: str) -> str:
    """Title, what the testbed is for, and the command (and time) that reproduces it."""
    kind = _kind(train_log["spec"])
    second = "" if kind == "glyphs" else (
        "\nA second testbed, of another kind than `builtin:testbed` (other images, more duplication, a\n"
        "DDIM scheduler), so that detection thresholds are checked on a testbed they were not tuned on.\n")
    title = "memaudit testbed" if kind == "glyphs" else f"memaudit {kind} testbed"
    return f"""# {title}: a tiny text-to-image model that memorized its duplicated training pairs

The built-in checkpoint `{BUILTIN_NAMES[kind]}`: a real `StableDiffusionPipeline` trained here, on CPU,
so that memaudit has something that truly memorizes, with ground truth by construction
(Carlini et al. 2023: the duplicated training examples are the ones that get memorized).
{second}
Reproduce: `{command}` ({train_log['seconds'] / 60:.0f} min on {_where(train_log)}).
"""


def _source_text(kind: str, n_images: int) -> str:
    """What the images of a dataset kind are built from (continues "built from data that ships")."""
    if kind == "maps":
        n_flat = int(round(FLAT_SHARE * n_images))
        return f"""with matplotlib: crops of the elevation grids `jacksboro_fault_dem.npz` and `topobathy.npz`
  and of the MRI slice `s1045.ima.gz`, rendered through a random colormap with or without random
  hill-shading, and crops of the photo `grace_hopper.jpg`; random side and place, random flips.
  {n_flat} of them ({FLAT_SHARE:.0%}) are near-flat instead: one colour each, a faint ramp and noise
  of a few grey levels, as real training sets hold (two such images are not copies of each other).
  Every image distinct: no two crops within a tiled L2 of {MIN_DISTANCE}, none busier than the
  small autoencoder gives back (mean |Laplacian| at most {MAX_CROP_DETAIL})."""
    return """with scikit-learn: a crop of `china.jpg` or `flower.jpg` with one `load_digits` glyph drawn
  over it in a random colour; every image distinct."""


def _data_section(data: dict[str, Any]) -> str:
    """How the image–caption pairs were built and duplicated, and the ground-truth files."""
    groups = data["duplicate_groups"]
    n_entries = data["n_single"] + sum(int(k) * n for k, n in groups.items())
    n_images = data["n_single"] + sum(groups.values()) + data["n_heldout"]
    dup_text = ", ".join(f"{n} pairs × {k}" for k, n in sorted(groups.items(), key=lambda kv: -int(kv[0])))
    return f"""## Data

- {n_images} image–caption pairs, {data['size']}×{data['size']} RGB, built from data that ships
  {_source_text(str(data.get('kind', 'glyphs')), n_images)}
- Captions are random phrases that do not describe the image, so an image can only come back
  from its caption if the pair was memorized.
- Training set: {dup_text}, and {data['n_single']} single pairs — {n_entries} entries per epoch.
  Held out: {data['n_heldout']} pairs never trained on (negatives).
- `{GROUND_TRUTH}`: every caption with its `duplicates` count (0 = held out), `key`, `split`,
  `group` and memaudit's `prompt_id`. `{AUDIT_PROMPTS}`: the default audit's prompts, 8 per group.
"""


def _model_section(train_log: dict[str, Any], folder: Path) -> str:
    """The pipeline's components and the size of the saved weights in ``folder``."""
    return f"""## Model

- UNet2DConditionModel trained here: three levels (32/64/64 channels; 16, 8 and 4 latent pixels),
  cross-attention at the lower two; AutoencoderKL trained here (32/64 channels, downsampling 2,
  4 latent channels, scaling factor {train_log['vae_scaling_factor']:.4f}); CLIPTextModel
  (hidden 32, 2 layers) with seeded random weights, frozen; CLIP's BPE tokenizer; {_scheduler(train_log['spec'])} scheduler
  with Stable Diffusion 1's noise schedule.
- Weights: float16 safetensors, {_size_mb(folder / PIPELINE):.1f} MB in `{PIPELINE}/`; load with
  `DiffusionPipeline.from_pretrained` (any dtype).
"""


def _training_section(train_log: dict[str, Any]) -> str:
    """The training recipe (from the recorded spec) and the losses it reached."""
    spec = train_log["spec"]
    return f"""## Training

Seed {spec['seed']}. VAE: {spec['vae_steps']} steps, batch {spec['batch_size']}, AdamW lr {spec['vae_lr']},
MSE + {spec['kl_weight']} × KL; final loss {train_log['vae_loss_last100']:.5f} (mean of the last 100 steps).
UNet: {spec['unet_steps']} steps, batch {spec['batch_size']}, AdamW lr {spec['unet_lr']} (warm-up {spec['warmup_steps']},
cosine to 10%), epsilon prediction, {spec['caption_dropout']:.0%} caption dropout, EMA {spec['ema_decay']};
loss {train_log['unet_loss_first100']:.4f} (first 100 steps) → {train_log['unet_loss_last100']:.4f} (last 100).
"""


def _memorization_section(evaluation: dict[str, Any], scheduler: str = "PNDM") -> str:
    """How memorization was measured (with ``scheduler``, the pipeline's own), the per-group
    results table, and the examples sheet."""
    return f"""## What it memorized

Tiled L2 (Carlini et al.: 4×4 tiles, RMS per tile on [0, 1] pixels, max over tiles) from each
generation to its caption's own training image; {evaluation['samples_per_caption']} samples per caption,
{evaluation['steps']} {scheduler} steps, guidance 7.5, run seed {evaluation['seed']}. "Extracted": captions with a sample
within {evaluation['threshold']} of their own image (matching verbatim, in Webster's terms). "Retrieved":
samples within {evaluation['threshold']} of *another* training image (retrieved verbatim: unseen and rarely
seen captions often fall back on a memorized image). "VAE floor": the autoencoder's own round
trip of the image, the closest any generation can come.

| group | captions | samples | median | 10%–90% | best-of-{evaluation['samples_per_caption']} median | extracted | retrieved | VAE floor |
|---|---|---|---|---|---|---|---|---|
{_results_table(evaluation)}

`{EXAMPLES}`: per row the training image, then {evaluation['samples_per_caption']} generations from its caption
(rows by group, in the order of the table). Re-measure: `memaudit testbed evaluate FOLDER`.
"""


def card_text(train_log: dict[str, Any], evaluation: dict[str, Any], folder: Path, command: str) -> str:
    """The model card's Markdown: one section per function, separated by a blank line.

    ``train_log`` is the trainer's log (with its ``spec``), ``evaluation`` the memorization
    measurement, ``folder`` the packaged testbed (its ``pipeline/`` is sized) and ``command`` the
    command line that reproduces it.
    """
    sections = [
        _intro_section(train_log, command),
        _data_section(train_log["spec"]["dataset"]),
        _model_section(train_log, folder),
        _training_section(train_log),
        _memorization_section(evaluation, _scheduler(train_log["spec"])),
    ]
    return "\n".join(sections)


def write_card(train_log: dict[str, Any], evaluation: dict[str, Any], folder: Path, command: str) -> Path:
    """Write the testbed's model card (``README.md``) into ``folder``, so the packaged checkpoint
    says how it was built, how to reproduce it and what it memorized."""
    (folder / CARD).write_text(card_text(train_log, evaluation, folder, command), encoding="utf-8")
    return folder / CARD
