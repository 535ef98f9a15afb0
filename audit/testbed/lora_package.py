"""Train, evaluate and package the LoRA testbed into one folder (what ``trained_lora/`` ships).

    OUT/adapter/pytorch_lora_weights.safetensors   the LoRA adapter of builtin:testbed (float16)
    OUT/ground_truth.parquet   every fine-tuning caption and its duplication count
    OUT/audit_prompts.txt      the audit's prompts: every duplicated caption, some singles, the held-out ones
    OUT/metrics.json           training log and memorization figures with and without the adapter
    OUT/examples.png           fine-tuning images beside their generations with the adapter
    OUT/README.md              the model card

Memorization is measured as for the other testbeds (``audit.testbed.evaluate``), twice: base +
adapter, and the base alone on the same captions (it never saw the fine-tuning set, so whatever
the first extracts and the second does not, the adapter memorized).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from audit.errors import MemauditError
from audit.testbed import card
from audit.testbed.checkpoints import testbed_folder
from audit.testbed.dataset import TestbedItem
from audit.testbed.evaluate import EXTRACTION_THRESHOLD, evaluate_memorization
from audit.testbed.lora import (
    ADAPTER_DIR, ADAPTER_FILE, BASE_TESTBED, LoraResult, LoraSpec, load_adapter, load_base, save_adapter, train_lora,
)

log = logging.getLogger(__name__)

WITHOUT_ADAPTER = "memorization_without_adapter"  # metrics.json: the base alone on the same captions


def audit_prompts_per_group(items: list[TestbedItem]) -> int:
    """How many captions per group the audit prompts take: every caption of the largest group
    other than the singles (so every duplicated and every held-out caption), as many singles."""
    sizes: dict[int, int] = {}
    for item in items:
        sizes[item.duplicates] = sizes.get(item.duplicates, 0) + 1
    return max(n for duplicates, n in sizes.items() if duplicates != 1)


def reload_difference(result: LoraResult, adapter: Path, base_folder: Path) -> float:
    """Largest absolute difference between the trained UNet's output and that of a fresh base
    pipeline with the saved adapter loaded (float16 rounding of the adapter's weights, no more)."""
    import torch

    pipe = load_adapter(load_base(base_folder), adapter)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        trained = result.pipeline.unet(sample, t, encoder_hidden_states=context).sample
        loaded = pipe.unet(sample, t, encoder_hidden_states=context).sample
    return float((trained - loaded).abs().max())


def train_and_package_lora(
    out: Path, spec: LoraSpec, command: str, captions_per_group: int = 8, samples_per_caption: int = 4,
    device: str = "cpu", base_folder: Path | None = None,
) -> dict[str, Any]:
    """Train the LoRA testbed from ``spec`` on the base testbed (default ``builtin:testbed``) and
    write the whole folder; returns the metrics written."""
    if out.exists() and any(out.iterdir()):
        raise MemauditError(f"{out}: folder exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    base_folder = base_folder or testbed_folder()
    result = train_lora(spec, base_folder, device)
    adapter = save_adapter(result, out / ADAPTER_DIR)
    card.write_ground_truth(result.items, out)
    card.write_audit_prompts(result.items, out, per_group=audit_prompts_per_group(result.items))
    result.log["adapter"] = {
        "file": f"{ADAPTER_DIR}/{ADAPTER_FILE}", "bytes": adapter.stat().st_size, "dtype": "float16",
        "reload_max_abs_diff": reload_difference(result, out / ADAPTER_DIR, base_folder),
    }
    settings = {"captions_per_group": captions_per_group, "samples_per_caption": samples_per_caption}
    log.info("measuring memorization with the adapter")
    with_adapter = evaluate_memorization(base_folder / card.PIPELINE, result.items, adapter=out / ADAPTER_DIR,
                                         **settings)
    log.info("measuring memorization of the base alone")
    without = evaluate_memorization(base_folder / card.PIPELINE, result.items, **settings)
    card.write_metrics(result.log, with_adapter, out)
    metrics = json.loads((out / card.METRICS).read_text())
    metrics[WITHOUT_ADAPTER] = {k: v for k, v in without.items() if k not in {"generations", "chosen"}}
    (out / card.METRICS).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    card.write_examples(result.items, with_adapter, out)
    (out / card.CARD).write_text(card_text(metrics, out, command), encoding="utf-8")
    return metrics


def _table(evaluation: dict[str, Any]) -> str:
    return (f"| group | captions | samples | median | 10%–90% | best-of-{evaluation['samples_per_caption']} median "
            "| extracted | retrieved | VAE floor |\n|---|---|---|---|---|---|---|---|---|\n"
            + card._results_table(evaluation))


def card_text(metrics: dict[str, Any], folder: Path, command: str) -> str:
    """The LoRA testbed's model card (Markdown), from its ``metrics.json`` content."""
    train_log = metrics["training"]
    spec = train_log["spec"]
    data = spec["dataset"]
    groups = {int(k): n for k, n in data["duplicate_groups"].items()}
    n_images = data["n_single"] + sum(groups.values()) + data["n_heldout"]
    n_entries = data["n_single"] + sum(k * n for k, n in groups.items())
    dup_text = ", ".join(f"{n} pairs × {k}" for k, n in sorted(groups.items(), reverse=True))
    with_adapter, without = metrics["memorization"], metrics[WITHOUT_ADAPTER]
    adapter = train_log["adapter"]
    base = train_log["base"]
    n_prompts = len((folder / card.AUDIT_PROMPTS).read_text(encoding="utf-8").split("\n")) - 1
    return f"""# memaudit LoRA testbed: an adapter of `{base}` that memorized its duplicated fine-tuning pairs

A LoRA adapter fine-tuned here, on CPU, on a small set of image–caption pairs with planted
duplicates, on top of the trained testbed `{base}` (frozen). Small fine-tuning sets are where
memorization risk is highest (Somepalli et al. 2023); the ground truth is by construction, as for
the other testbeds (Carlini et al. 2023: the duplicated pairs are the memorized ones).

Load it with diffusers onto the base: `pipe = StableDiffusionPipeline.from_pretrained(testbed_folder() / "pipeline")`,
then `pipe.load_lora_weights(lora_testbed_folder() / "{ADAPTER_DIR}")` (both from `audit.testbed.checkpoints`;
`lora_testbed_adapter()` is the safetensors file). Its audit prompts: `prompts.source: builtin:testbed-lora`.

Reproduce: `{command}` ({train_log['seconds'] / 60:.1f} min on {card._where(train_log)}).

## Data

- {n_images} image–caption pairs of the glyph kind, {data['size']}×{data['size']} RGB, built from data that ships
  {card._source_text('glyphs', n_images)}
  Seed {spec['seed']}: a new set, checked to share no caption and no image with `{base}`'s dataset
  (training and held-out pairs); the closest base image is at tiled L2 {train_log['closest_base_image']:.3f}
  (the extraction threshold is {EXTRACTION_THRESHOLD}: no base image passes for a fine-tuning one).
- Captions are random phrases that do not describe the image, so an image can only come back
  from its caption if the pair was memorized.
- Fine-tuning set: {dup_text}, and {data['n_single']} single pairs — {n_entries} entries per epoch.
  Held out: {data['n_heldout']} pairs never trained on (negatives).
- `{card.GROUND_TRUTH}`: every caption with its `duplicates` count (0 = held out), `key`, `split`,
  `group` and memaudit's `prompt_id`. `{card.AUDIT_PROMPTS}`: {n_prompts} prompts, every duplicated and
  every held-out caption and as many singles. `memaudit reference testbed REF --testbed lora` builds
  a reference holding everything base + adapter was trained on: the fine-tuning set with its
  duplicates and the base testbed's training set (keys `base-...`).

## Adapter

- LoRA (peft, `unet.add_adapter`) of rank {spec['rank']}, alpha {spec['alpha']}, on the UNet's
  {', '.join(f'`{m}`' for m in spec['target_modules'])} layers: {train_log['trainable_parameters']:,} parameters.
  The VAE, the text encoder and the UNet's own weights are `{base}`'s, unchanged.
- `{adapter['file']}`: diffusers' `save_lora_weights` format, {adapter['dtype']} safetensors,
  {adapter['bytes'] / 2**10:.0f} KiB, with its LoRA config as metadata. Reloaded onto the base, the UNet's output
  is within {adapter['reload_max_abs_diff']:.1e} of the trained one.

## Training

Seed {spec['seed']}. {spec['steps']} steps ({train_log['epochs']:.0f} epochs), batch {spec['batch_size']},
AdamW lr {spec['lr']} (warm-up {spec['warmup_steps']}, cosine to 10%), on the LoRA weights only;
latents from the base's VAE (posterior mean × its scaling factor), captions through its frozen
text encoder; epsilon prediction on Stable Diffusion 1's noise schedule, {spec['caption_dropout']:.0%} caption
dropout, no EMA.
Loss {train_log['loss_first100']:.4f} (first 100 steps) → {train_log['loss_last100']:.4f} (last 100).

## What it memorized

Tiled L2 (Carlini et al.: 4×4 tiles, RMS per tile on [0, 1] pixels, max over tiles) from each
generation to its caption's own fine-tuning image; {with_adapter['samples_per_caption']} samples per caption,
{with_adapter['steps']} PNDM steps, guidance 7.5, run seed {with_adapter['seed']}. "Extracted": captions with a sample
within {with_adapter['threshold']} of their own image. "Retrieved": samples within
{with_adapter['threshold']} of *another* fine-tuning image. "VAE floor": the autoencoder's own round
trip of the image.

With the adapter (`{base}` + `{ADAPTER_DIR}/`):

{_table(with_adapter)}

The base alone (`{base}`, no adapter), same captions and seeds:

{_table(without)}

`{card.EXAMPLES}`: per row the fine-tuning image, then {with_adapter['samples_per_caption']} generations with the
adapter from its caption (rows by group, in the order of the tables).
"""


__all__ = ["LoraSpec", "card_text", "train_and_package_lora"]
