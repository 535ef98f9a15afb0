"""Calibrated verdicts (docs/calibration.md): the train->train null, thresholds as false-label
rates, low-information pairs, and a flag test that does not weaken with more samples.

The reference is the shipped testbed's training set, embedded with the real copy descriptor,
indexed with faiss and calibrated in this process (no Ray: the steps are Ray-free)."""

from __future__ import annotations

import io
import shutil
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.cli import main
from audit.config import load_config
from audit.detect import verify
from audit.detect.scores import clique_min, clique_p_value, copies_p_value, flag_p_value, memorization_score
from audit.detect.thresholds import CALIBRATED, resolve
from audit.embed.embedding import EmbedStage
from audit.errors import InputError
from audit.location import Location
from audit.reference.calibration import CALIBRATION_JSON, calibrate, calibration_dir, load_calibration
from audit.reference.embed_shard import embed_source_shard
from audit.reference.folder import write_embedding_json
from audit.reference.index import build_index
from audit.reference.sources import find_shards
from audit.reference.training_set import write_training_set
from audit.testbed.dataset import TestbedItem as Item, build_dataset
from audit.testbed.train import spec_from_dict

CFG = load_config(None)
MODEL_ID = "builtin:testbed-copy"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def build_reference(items: list[Item], out: Path) -> Path:
    """The training set of ``items`` as a reference folder: img2dataset shards, embedded with the
    testbed's copy descriptor, indexed (what `memaudit reference testbed` does, without Ray)."""
    source = write_training_set(items, out / "img2dataset")
    stage = EmbedStage(CFG.embedding, "cpu")
    for shard in find_shards(Location.of(source), "auto"):
        embed_source_shard(stage, Location.of(out), shard, int(shard.name))
    write_embedding_json(out, stage.model_id, stage.dim)
    build_index(out, CFG.reference)
    return out


@pytest.fixture(scope="module")
def testbed_items() -> list[Item]:
    from audit.testbed.checkpoints import testbed_folder

    spec = spec_from_dict(json.loads((testbed_folder() / "metrics.json").read_text())["training"]["spec"])
    return build_dataset(spec.dataset, spec.seed)


@pytest.fixture(scope="module")
def reference(testbed_items: list[Item], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_reference(testbed_items, tmp_path_factory.mktemp("calibration") / "ref")
    record = calibrate(folder, CFG.detection, CFG.reference)
    assert record["images"] >= 600 and record["with_pixels"] == record["images"]
    return folder


@pytest.fixture(scope="module")
def calibrated(reference: Path):
    return resolve(CFG.detection, load_calibration(reference, CFG.detection, MODEL_ID))


@pytest.fixture(scope="module")
def embedder() -> EmbedStage:
    return EmbedStage(CFG.embedding, "cpu")


def measured_label(embedder: EmbedStage, sample: np.ndarray, training: np.ndarray, thresholds, own: bool = True) -> str:
    """Verify one (sample, training image) pair exactly as detection does: embeddings from the
    copy descriptor, pixels at the common size, Webster's label at ``thresholds``."""
    a, b = png(sample), png(training)
    vectors = embedder({"image": np.array([a, b], dtype=object)})["embedding"].astype(np.float32)
    return verify.label(verify.compare(a, b, vectors[0], vectors[1], CFG.detection), own, thresholds)


def test_calibrated_thresholds_are_the_nulls_false_label_rates(reference: Path, calibrated) -> None:
    null = load_calibration(reference, CFG.detection, MODEL_ID)
    closest = np.nanmin(null.tiled_l2, axis=1)
    assert calibrated.source == CALIBRATED and calibrated.low_information
    # the threshold sits at the match_fpr quantile of distinct training images' closest distances
    assert np.mean(closest < calibrated.match_l2) <= CFG.detection.match_fpr + 1 / null.size
    assert np.mean(null.split_product.max(axis=1) >= calibrated.template_similarity) <= CFG.detection.template_fpr + 1 / null.size
    assert calibrated.verbatim_rate.of == null.size and calibrated.verbatim_rate.upper >= calibrated.verbatim_rate.rate
    # the paper's split-product 0.5 calls every distinct training pair of this set a template copy
    paper = resolve(CFG.detection.model_copy(update={"calibration": "paper"}), null)
    assert paper.template_similarity == 0.5 and paper.template_rate.rate > 0.9
    assert paper.template_rate.rate > 10 * calibrated.template_rate.rate


def test_flat_and_low_contrast_images_are_never_verbatim(embedder: EmbedStage, calibrated) -> None:
    rng = np.random.default_rng(3)
    colours = [(30, 30, 90), (110, 100, 130), (20, 20, 20), (35, 30, 28), (200, 200, 205), (190, 195, 200)]
    flats = [np.full((32, 32, 3), c, np.uint8) for c in colours]
    low_contrast = [np.clip(np.full((32, 32, 3), c, np.float32) + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
                    for c in colours]
    images = flats + low_contrast
    labels = {measured_label(embedder, a, b, calibrated) for i, a in enumerate(images) for j, b in enumerate(images) if i != j}
    assert not labels & {verify.MATCHING, verify.RETRIEVED}, labels
    assert verify.LOW_INFORMATION in labels
    # under the papers' constants the same pairs are called copies: what the calibrated rule fixes
    paper = resolve(CFG.detection.model_copy(update={"calibration": "paper"}), None)
    assert measured_label(embedder, flats[2], flats[3], paper) == verify.MATCHING


def test_two_crops_of_one_photo_offset_by_a_few_pixels_stay_a_copy(embedder: EmbedStage, calibrated) -> None:
    from sklearn.datasets import load_sample_images

    china = load_sample_images().images[0]
    def crop(dy: int, dx: int) -> np.ndarray:
        region = china[100 + dy:164 + dy, 200 + dx:264 + dx]
        return np.asarray(Image.fromarray(region).resize((32, 32), Image.Resampling.BICUBIC))
    paper = resolve(CFG.detection.model_copy(update={"calibration": "paper"}), None)
    for offset in ((1, 0), (0, 2), (2, 1)):
        before = measured_label(embedder, crop(*offset), crop(0, 0), paper)
        assert before == verify.MATCHING
        assert measured_label(embedder, crop(*offset), crop(0, 0), calibrated) == before


def vae_copies(images: np.ndarray) -> np.ndarray:
    """Training images through the shipped testbed's own autoencoder: what a generation that
    regenerates them looks like (its VAE floor)."""
    from audit.testbed.checkpoints import testbed_folder
    from audit.testbed.evaluate import vae_round_trip

    return vae_round_trip(testbed_folder() / "pipeline", images)


def test_a_prompt_copying_in_a_quarter_of_its_seeds_is_flagged_at_every_n(
        testbed_items: list[Item], embedder: EmbedStage, calibrated) -> None:
    """Real testbed images: the prompt's training image regenerated (VAE round trip) in 25% of
    seeds, distinct held-out images (in their 8 orientations) otherwise; a prompt without copies
    draws only from the latter. Verified on pixels at the calibrated thresholds, then tested."""
    own = next(i for i in testbed_items if i.duplicates == 32)
    copy = vae_copies(own.image[None])[0]
    others = [np.rot90(np.flip(i.image, 0) if f else i.image, r).copy() for i in testbed_items if i.duplicates == 0
              for f in (0, 1) for r in range(4)]
    label_copy = measured_label(embedder, copy, own.image, calibrated)
    other_labels = [measured_label(embedder, o, own.image, calibrated) for o in others]
    assert label_copy == verify.MATCHING and verify.MATCHING not in other_labels
    minimum = {}
    flagged_before, flagged_after, clean = {}, {}, {}
    for n in (16, 64, 500):
        copies = n // 4
        labels = [label_copy] * copies + [other_labels[i % len(other_labels)] for i in range(n - copies)]
        matching = labels.count(verify.MATCHING)
        minimum[n] = clique_min("auto", n)
        p = flag_p_value(n, matching, 0, minimum[n], calibrated.verbatim_rate.upper, calibrated.pair_rate.upper)
        flagged_after[n] = p <= calibrated.flag_fpr
        flagged_before[n] = memorization_score(n, matching, 0, minimum[n]) >= 0.5  # the old fraction rule
        no_copies = [other_labels[i % len(other_labels)] for i in range(n)].count(verify.MATCHING)
        clean[n] = flag_p_value(n, no_copies, 0, minimum[n], calibrated.verbatim_rate.upper,
                                calibrated.pair_rate.upper) <= calibrated.flag_fpr
    assert all(flagged_after.values()), flagged_after
    assert not any(flagged_before.values()), flagged_before  # what the issue reported: 30% copies never flagged
    assert not any(clean.values()), clean


def test_flag_evidence_only_grows_with_samples() -> None:
    rate, pair = 0.007, 0.005
    # a fixed share of copies: the p-value falls as n grows
    values = [copies_p_value(n, n // 4, rate) for n in (8, 16, 32, 64, 128, 500)]
    assert all(b <= a for a, b in zip(values, values[1:])), values
    assert copies_p_value(500, 0, rate) == 1.0 and copies_p_value(0, 0, rate) == 1.0
    # one false copy in a few samples is what false labels alone give: not evidence
    assert copies_p_value(16, 1, rate) > 1e-3
    # a clique under the minimum never counts; a large one among few samples is overwhelming
    assert clique_p_value(500, 9, pair, 10) == 1.0
    assert clique_p_value(16, 8, pair, 3) < 1e-20
    assert flag_p_value(16, 0, 1, 3, rate, pair) == 1.0


def test_a_calibration_of_another_embedder_or_size_is_refused(reference: Path, tmp_path: Path) -> None:
    record_path = calibration_dir(reference) / CALIBRATION_JSON
    original = record_path.read_text()
    with pytest.raises(InputError, match="detection.verify_size: calibrated 256, configured 128.*reference calibrate"):
        load_calibration(reference, CFG.detection.model_copy(update={"verify_size": 128}), MODEL_ID)
    with pytest.raises(InputError, match="embedder builtin:testbed-copy.*open_clip:ViT-B-32.*calibration: paper"):
        load_calibration(reference, CFG.detection, "open_clip:ViT-B-32")
    try:
        record_path.write_text(original.replace('"count": 1272', '"count": 999'))
        with pytest.raises(InputError, match="another index"):
            load_calibration(reference, CFG.detection, MODEL_ID)
    finally:
        record_path.write_text(original)
    # the CLI: a mismatched calibration is refused with the fix, --force measures it again
    assert main(["reference", "calibrate", str(reference), "--set", "detection.verify_size=128"]) == 2
    assert main(["reference", "calibrate", str(reference)]) == 0  # current: nothing to do


def test_fewer_than_100_training_images_are_refused_but_paper_mode_works(
        testbed_items: list[Item], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = build_reference([i for i in testbed_items if i.duplicates == 1][:60], tmp_path / "small")
    assert main(["reference", "calibrate", str(small)]) == 2
    assert "calibration needs at least 100" in capsys.readouterr().err
    assert not (calibration_dir(small) / CALIBRATION_JSON).exists()
    with pytest.raises(InputError, match="calibration: paper"):
        resolve(CFG.detection, load_calibration(small, CFG.detection, MODEL_ID))
    paper = resolve(CFG.detection.model_copy(update={"calibration": "paper"}), None)
    assert paper.match_l2 == 0.15 and not paper.low_information and not paper.verbatim_rate.measured


def test_an_audit_calibrates_a_reference_without_one_and_remeasures_only_its_own(reference: Path, tmp_path: Path) -> None:
    from audit.detect.thresholds import for_audit

    copy = tmp_path / "ref"
    shutil.copytree(reference, copy)
    shutil.rmtree(calibration_dir(copy))
    paper_mode = CFG.detection.model_copy(update={"calibration": "paper"})
    assert for_audit(paper_mode, CFG.reference, copy, MODEL_ID).verbatim_rate.of == 0  # paper mode: nothing measured
    assert not calibration_dir(copy).exists()
    published: list[str] = []
    measured = for_audit(CFG.detection, CFG.reference, copy, MODEL_ID, publish=lambda p: published.append(p.name))
    assert measured.source == CALIBRATED and published == ["null.parquet", "calibration.json"]
    other = CFG.detection.model_copy(update={"verify_top": 2})
    with pytest.raises(InputError, match="verify_top: calibrated 3, configured 2"):
        for_audit(other, CFG.reference, copy, MODEL_ID)  # a user's reference: refused, never overwritten
    assert for_audit(other, CFG.reference, copy, MODEL_ID, owned=True).calibration["verify_top"] == 2  # a built-in one
