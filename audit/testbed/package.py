"""Train, evaluate and package the testbed into one folder (what ``builtin:testbed`` ships).

    OUT/pipeline/              the diffusers pipeline (float16 safetensors)
    OUT/ground_truth.parquet   every caption and its duplication count
    OUT/audit_prompts.txt      the default audit's prompts
    OUT/metrics.json           training log and memorization figures
    OUT/examples.png           training images beside their generations
    OUT/README.md              the model card
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from audit.errors import MemauditError
from audit.testbed import card
from audit.testbed.dataset import build_dataset
from audit.testbed.evaluate import evaluate_memorization
from audit.testbed.train import TrainSpec, save_testbed, spec_from_dict, train_testbed

log = logging.getLogger(__name__)


def train_and_package(
    out: Path, spec: TrainSpec, command: str, captions_per_group: int = 16, samples_per_caption: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the testbed from ``spec`` and write the whole folder; returns the evaluation."""
    if out.exists() and any(out.iterdir()):
        raise MemauditError(f"{out}: folder exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    result = train_testbed(spec, device)
    save_testbed(result, out / card.PIPELINE)
    card.write_ground_truth(result.items, out)
    card.write_audit_prompts(result.items, out)
    log.info("measuring memorization")
    evaluation = evaluate_memorization(
        out / card.PIPELINE, result.items, captions_per_group=captions_per_group,
        samples_per_caption=samples_per_caption,
    )
    card.write_metrics(result.log, evaluation, out)
    card.write_examples(result.items, evaluation, out)
    card.write_card(result.log, evaluation, out, command)
    return evaluation


def remeasure(folder: Path, command: str) -> dict[str, Any]:
    """Re-evaluate a packaged testbed and rewrite its metrics, examples and card, keeping the
    training log (for when the measurement, not the model, changed)."""
    recorded = json.loads((folder / card.METRICS).read_text())
    _, measured = evaluate_folder(folder)
    spec = spec_from_dict(recorded["training"]["spec"])
    items = build_dataset(spec.dataset, spec.seed)
    card.write_metrics(recorded["training"], measured, folder)
    card.write_examples(items, measured, folder)
    card.write_card(recorded["training"], measured, folder, command)
    return measured


def evaluate_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Re-measure a packaged testbed with the settings its metrics recorded.
    Returns (recorded, measured now)."""
    metrics_path = folder / card.METRICS
    if not metrics_path.is_file():
        raise MemauditError(f"{folder}: no {card.METRICS}; give a folder written by `memaudit testbed train`")
    recorded = json.loads(metrics_path.read_text())
    spec = spec_from_dict(recorded["training"]["spec"])
    memo = recorded["memorization"]
    measured = evaluate_memorization(
        folder / card.PIPELINE,
        build_dataset(spec.dataset, spec.seed),
        captions_per_group=max(g["captions"] for g in memo["groups"]),
        samples_per_caption=memo["samples_per_caption"],
        steps=memo["steps"],
        seed=memo["seed"],
    )
    return memo, measured


def format_groups(evaluation: dict[str, Any]) -> str:
    lines = [f"{'group':>8} {'captions':>8} {'median':>8} {'best-of-n':>9} {'extracted':>9} {'retrieved':>9} {'vae floor':>9}"]
    for g in evaluation["groups"]:
        lines.append(f"{g['group']:>8} {g['captions']:>8} {g['median']:>8.3f} {g['best_of_n_median']:>9.3f} "
                     f"{g['extracted']:>9.0%} {g.get('retrieved', float('nan')):>9.0%} {g['vae_floor_median']:>9.3f}")
    return "\n".join(lines)


__all__ = ["TrainSpec", "evaluate_folder", "format_groups", "remeasure", "train_and_package"]
