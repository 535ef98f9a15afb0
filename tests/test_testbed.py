"""The trained testbed: dataset ground truth, the committed pipeline, and its memorization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audit import ids
from audit.similarity import tiled_l2
from audit.testbed import card
from audit.testbed import checkpoints
from audit.testbed.dataset import DatasetSpec, build_dataset, training_entries
from audit.testbed.evaluate import EXTRACTION_THRESHOLD, generate_for
from audit.testbed.train import spec_from_dict

TRAINED = checkpoints.testbed_folder()


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((TRAINED / card.METRICS).read_text())


@pytest.fixture(scope="module")
def items(recorded: dict) -> list:
    spec = spec_from_dict(recorded["training"]["spec"])
    return build_dataset(spec.dataset, spec.seed)


def test_dataset_is_deterministic_distinct_and_counted() -> None:
    spec = DatasetSpec(n_single=20, duplicate_groups={2: 3, 8: 2}, n_heldout=5)
    first, again = build_dataset(spec, seed=3), build_dataset(spec, seed=3)
    assert [i.caption for i in first] == [i.caption for i in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert [i.caption for i in build_dataset(spec, seed=4)] != [i.caption for i in first]
    assert len({i.caption for i in first}) == len(first) == 30
    assert [i.duplicates for i in first].count(8) == 2 and [i.duplicates for i in first].count(0) == 5
    assert len(training_entries(first)) == 20 + 3 * 2 + 2 * 8
    images = np.stack([i.image for i in first])
    distances = tiled_l2(images[:, None], images[None, :])
    off_diagonal = distances[~np.eye(len(first), dtype=bool)]
    assert off_diagonal.min() > 2 * EXTRACTION_THRESHOLD  # no pair is a near-copy of another


def test_committed_pipeline_loads_offline_with_from_pretrained() -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    folder = checkpoints.builtin_checkpoint("testbed")
    assert folder == TRAINED / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    weights = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in weights if p.suffix in {".bin", ".ckpt", ".pt"}]
    assert sum(p.stat().st_size for p in weights) <= 15 * 2**20


def test_ground_truth_matches_the_dataset(items: list, recorded: dict) -> None:
    table = pq.read_table(TRAINED / card.GROUND_TRUTH).to_pylist()
    assert [row["caption"] for row in table] == [i.caption for i in items]
    assert [row["duplicates"] for row in table] == [i.duplicates for i in items]
    assert all(row["prompt_id"] == ids.prompt_id(row["caption"]) for row in table)
    groups = recorded["training"]["spec"]["dataset"]["duplicate_groups"]
    for k, n in groups.items():
        assert sum(row["duplicates"] == int(k) for row in table) == n
    prompts = (TRAINED / card.AUDIT_PROMPTS).read_text().splitlines()
    by_caption = {row["caption"]: row["duplicates"] for row in table}
    assert all(p in by_caption for p in prompts)
    assert {by_caption[p] for p in prompts} == {0, 1, *map(int, groups)}


def test_model_card_reports_the_recorded_figures(recorded: dict) -> None:
    text = (TRAINED / card.CARD).read_text()
    for group in recorded["memorization"]["groups"]:
        assert f"| {group['group']} | {group['captions']} | {group['samples']} | {group['median']:.3f} |" in text
    assert "memaudit testbed train OUT --seed" in text


def test_duplicated_captions_regenerate_their_image_held_out_do_not(items: list) -> None:
    """The acceptance in miniature: 4 heavily duplicated and 4 held-out captions, 2 samples each."""
    top = max(i.duplicates for i in items)
    memorized = [i for i in items if i.duplicates == top][:4]
    heldout = [i for i in items if i.duplicates == 0][:4]
    chosen = memorized + heldout
    generations = generate_for(TRAINED / "pipeline", chosen, samples_per_caption=2, steps=20)
    distances = tiled_l2(generations, np.stack([i.image for i in chosen])[:, None])
    dup, held = distances[:4], distances[4:]
    print(f"dup{top} median {np.median(dup):.3f}, held-out median {np.median(held):.3f}")
    assert np.median(dup) < EXTRACTION_THRESHOLD
    assert np.median(held) > 2 * np.median(dup)
    assert held.min() > EXTRACTION_THRESHOLD  # no held-out caption reproduces its unseen image


def test_trainer_runs_end_to_end_on_a_toy_budget(tmp_path: Path) -> None:
    """The whole train -> save -> ground truth -> evaluate -> card path, a few steps only."""
    from audit.testbed.package import train_and_package
    from audit.testbed.train import TrainSpec

    spec = TrainSpec(seed=1, dataset=DatasetSpec(n_single=6, duplicate_groups={4: 2}, n_heldout=2),
                     vae_steps=3, unet_steps=3, batch_size=4, warmup_steps=1)
    evaluation = train_and_package(tmp_path / "tb", spec, "memaudit testbed train OUT --seed 1",
                                   captions_per_group=1, samples_per_caption=1)
    names = {p.name for p in (tmp_path / "tb").iterdir()}
    assert {card.PIPELINE, card.GROUND_TRUTH, card.AUDIT_PROMPTS, card.METRICS, card.CARD, card.EXAMPLES} <= names
    assert [g["group"] for g in evaluation["groups"]] == ["dup4", "single", "heldout"]
    recorded = json.loads((tmp_path / "tb" / card.METRICS).read_text())
    assert spec_from_dict(recorded["training"]["spec"]) == spec
    assert len(recorded["training"]["unet_loss_curve"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_retraining_from_the_seed_reproduces_the_figures(tmp_path: Path, recorded: dict) -> None:
    """Re-runs the full training (about half an hour on 2 CPU cores) and compares figures."""
    from audit.testbed.package import train_and_package

    spec = spec_from_dict(recorded["training"]["spec"])
    memo = recorded["memorization"]
    again = train_and_package(tmp_path / "again", spec, "test", captions_per_group=memo["groups"][0]["captions"],
                              samples_per_caption=memo["samples_per_caption"])
    for old, new in zip(memo["groups"], again["groups"]):
        assert new["group"] == old["group"]
        assert new["median"] == pytest.approx(old["median"], abs=0.03), old["group"]
        assert new["extracted"] == pytest.approx(old["extracted"], abs=0.2), old["group"]
