"""The maps testbed (``builtin:testbed-maps``): a second shipped testbed of another kind, so that
detection thresholds are validated on data they were not tuned on. Its dataset, the packaged
pipeline, its builtin names, and that adding it left the glyph testbed exactly as it was."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audit.config import PromptsSection
from audit.errors import InputError
from audit.prompts import read_prompts, resolve_source
from audit.reference.locate import builtin_reference_folder, builtin_reference_name
from audit.reference.training_set import write_shipped_training_set
from audit.similarity import pairwise_tiled_l2
from audit.testbed import card, checkpoints
from audit.testbed.dataset import (
    FLAT_SHARE, MAPS, MAX_CROP_DETAIL, MIN_DISTANCE, build_dataset, detail, is_flat, training_entries,
)
from audit.testbed.evaluate import EXTRACTION_THRESHOLD, group_name
from audit.testbed.train import spec_from_dict, train_spec

MAPS_FOLDER = checkpoints.maps_testbed_folder()
GLYPHS_FOLDER = checkpoints.testbed_folder()
# sha256 over (caption, image bytes, duplicates) of every glyph item, taken before the maps kind
# was added: the glyph testbed's training set must stay byte for byte what its weights were
# trained on (its reference is rebuilt from the spec, not shipped).
GLYPHS_SHA256 = "102ef417d9c1ca6ddf4b15c778ad8bae0aa089d1c7f25bb6eab540da54984051"


@pytest.fixture(scope="module")
def maps_items() -> list:
    return build_dataset(MAPS, seed=0)


def _digest(items: list) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.caption.encode())
        digest.update(item.image.tobytes())
        digest.update(bytes([item.duplicates]))
    return digest.hexdigest()


def test_maps_dataset_is_deterministic_and_depends_on_the_seed(maps_items: list) -> None:
    again = build_dataset(MAPS, seed=0)
    assert _digest(again) == _digest(maps_items)
    other = build_dataset(MAPS, seed=1)
    assert not np.array_equal(other[0].image, maps_items[0].image)


def test_maps_dataset_has_its_groups(maps_items: list) -> None:
    counts = Counter(item.duplicates for item in maps_items)
    assert counts == {48: 12, 16: 12, 4: 12, 1: 400, 0: 48}
    assert {group_name(d) for d in counts} == {"dup48", "dup16", "dup4", "single", "heldout"}
    assert len(training_entries(maps_items)) == 48 * 12 + 16 * 12 + 4 * 12 + 400
    assert len({item.caption for item in maps_items}) == len(maps_items)
    assert [item.index for item in maps_items] == list(range(len(maps_items)))


def test_maps_images_are_distinct_and_about_eight_percent_are_near_flat(maps_items: list) -> None:
    images = np.stack([item.image for item in maps_items])
    assert images.shape == (484, 32, 32, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == len(images)
    flat = np.array([is_flat(image) for image in images])
    assert flat.sum() == round(FLAT_SHARE * len(images)) == 39
    means = {tuple(np.round(image.reshape(-1, 3).mean(axis=0)).astype(int)) for image in images[flat]}
    assert len(means) == flat.sum()  # each flat image has its own colour
    distances = pairwise_tiled_l2(images)
    np.fill_diagonal(distances, np.inf)
    assert distances[~flat][:, ~flat].min() >= MIN_DISTANCE  # no crop is a near-copy of another crop
    assert distances[flat][:, ~flat].min() >= MIN_DISTANCE
    assert max(detail(image) for image in images[~flat]) <= MAX_CROP_DETAIL  # every crop can be reconstructed
    # The trap the kind exists for: some flat images of nearby colours are closer than the
    # extraction threshold, yet none is a copy of another.
    assert distances[flat][:, flat].min() < EXTRACTION_THRESHOLD
    # Flat images sit among the training pairs too, not only among the held-out ones.
    assert {item.split for item, f in zip(maps_items, flat) if f} == {"train", "heldout"}


def test_glyph_kind_is_unchanged_against_the_shipped_ground_truth() -> None:
    recorded = json.loads((GLYPHS_FOLDER / card.METRICS).read_text())["training"]["spec"]
    assert "kind" not in recorded["dataset"] and "scheduler" not in recorded  # recorded before kinds
    spec = spec_from_dict(recorded)
    assert spec.dataset.kind == "glyphs" and spec.scheduler == "pndm"
    items = build_dataset(spec.dataset, spec.seed)
    truth = pq.read_table(GLYPHS_FOLDER / card.GROUND_TRUTH).to_pylist()
    assert [item.caption for item in items] == [row["caption"] for row in truth]
    assert [item.duplicates for item in items] == [row["duplicates"] for row in truth]
    assert _digest(items) == GLYPHS_SHA256


def test_maps_spec_round_trips_through_its_recorded_metrics() -> None:
    recorded = json.loads((MAPS_FOLDER / card.METRICS).read_text())["training"]["spec"]
    spec = spec_from_dict(recorded)
    assert spec.dataset == MAPS and spec.scheduler == "ddim"
    assert spec_from_dict(json.loads(json.dumps(train_spec("maps").to_dict()))) == train_spec("maps")
    with pytest.raises(ValueError, match="kind"):
        train_spec("sketches")


def test_shipped_maps_pipeline_loads_with_a_ddim_scheduler() -> None:
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

    folder = checkpoints.builtin_checkpoint("testbed-maps")
    assert folder == MAPS_FOLDER / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    config = pipe.scheduler.config
    assert (config.set_alpha_to_one, config.steps_offset, config.clip_sample) == (False, 1, False)
    assert config.beta_schedule == "scaled_linear" and config.num_train_timesteps == 1000
    weights = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in weights if p.suffix in {".bin", ".ckpt", ".pt"}]
    assert sum(p.stat().st_size for p in weights) <= 15 * 2**20


def test_maps_ground_truth_and_card_describe_the_maps_kind(maps_items: list) -> None:
    truth = pq.read_table(MAPS_FOLDER / card.GROUND_TRUTH).to_pylist()
    assert [row["caption"] for row in truth] == [item.caption for item in maps_items]
    assert [row["group"] for row in truth] == [group_name(item.duplicates) for item in maps_items]
    text = (MAPS_FOLDER / card.CARD).read_text()
    assert "builtin:testbed-maps" in text and "matplotlib" in text and "scikit-learn" not in text
    assert "--kind maps" in text and "DDIM" in text and "PNDM" not in text
    glyphs = json.loads((GLYPHS_FOLDER / card.METRICS).read_text())
    rendered = card.card_text(glyphs["training"], glyphs["memorization"], GLYPHS_FOLDER,
                              "memaudit testbed train OUT --seed 0")
    assert rendered == (GLYPHS_FOLDER / card.CARD).read_text()  # the glyph card's text is unchanged


def test_builtin_testbed_maps_resolves_for_model_and_prompts(maps_items: list) -> None:
    assert checkpoints.builtin_checkpoint("testbed") == GLYPHS_FOLDER / "pipeline"
    path, fmt = resolve_source(PromptsSection(source="builtin:testbed-maps"))
    assert path == MAPS_FOLDER / card.AUDIT_PROMPTS and fmt == "txt"
    prompts = read_prompts(PromptsSection(source="builtin:testbed-maps")).prompts
    groups = Counter(group_name(item.duplicates) for item in maps_items if item.caption in set(prompts))
    assert groups == {"dup48": 8, "dup16": 8, "dup4": 8, "single": 8, "heldout": 8}
    glyph_prompts = read_prompts(PromptsSection(source="builtin:testbed")).prompts
    assert not set(prompts) & set(glyph_prompts)
    with pytest.raises(InputError, match="testbed-maps"):
        checkpoints.builtin_checkpoint("testbed-nope")


def test_each_builtin_reference_has_its_own_folder_and_training_set(tmp_path: Path, maps_items: list) -> None:
    glyphs, maps = builtin_reference_folder("builtin:testbed"), builtin_reference_folder("builtin:testbed-maps")
    assert glyphs != maps and glyphs.name == "testbed-reference-v1"
    assert builtin_reference_name("builtin:testbed-maps") == "testbed-maps"
    with pytest.raises(InputError, match="unknown built-in reference"):
        builtin_reference_folder("builtin:testbed-nope")
    source = write_shipped_training_set(tmp_path, "testbed-maps")
    rows = pq.read_table(source, columns=["caption"]).column("caption").to_pylist()
    assert Counter(rows) == Counter(maps_items[i].caption for i in training_entries(maps_items))


def test_cli_takes_the_kind_and_the_reference_testbed() -> None:
    from audit.cli import _parser

    args = _parser().parse_args(["testbed", "train", "out", "--kind", "maps", "--unet-steps", "5"])
    assert (args.kind, args.unet_steps) == ("maps", 5)
    assert _parser().parse_args(["testbed", "train", "out"]).kind == "glyphs"
    assert _parser().parse_args(["reference", "testbed", "out", "--testbed", "maps"]).testbed == "maps"
    assert _parser().parse_args(["reference", "testbed", "out"]).testbed == "glyphs"
