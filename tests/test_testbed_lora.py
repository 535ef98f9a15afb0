"""The LoRA testbed (``trained_lora/``): a LoRA adapter of ``builtin:testbed`` fine-tuned on a small
set with planted duplicates. The shipped adapter, its fine-tuning set and ground truth, its prompt
source and reference, a cheap re-measure of what it memorized, and the trainer itself."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audit.config import PromptsSection
from audit.prompts import read_prompts, resolve_source
from audit.reference.training_set import item_key, write_shipped_training_set
from audit.testbed import card, checkpoints
from audit.testbed.evaluate import EXTRACTION_THRESHOLD, generate_for
from audit.testbed.lora import (
    ADAPTER_DIR, LoraSpec, base_items, check_disjoint, finetune_items, load_adapter, load_base, recorded_spec,
    train_lora,
)
from audit.similarity import tiled_l2

FOLDER = checkpoints.lora_testbed_folder()
BASE = checkpoints.testbed_folder()
METRICS = json.loads((FOLDER / card.METRICS).read_text())


@pytest.fixture(scope="module")
def items() -> list:
    return finetune_items(recorded_spec(FOLDER))


def _unet_output(pipe) -> np.ndarray:
    import torch

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample.numpy()


def test_the_shipped_adapter_is_small_float16_safetensors() -> None:
    from safetensors import safe_open

    path = checkpoints.lora_testbed_adapter()
    assert path == FOLDER / ADAPTER_DIR / "pytorch_lora_weights.safetensors"
    assert path.stat().st_size <= 2 * 2**20
    assert path.stat().st_size == METRICS["training"]["adapter"]["bytes"]
    with safe_open(str(path), framework="pt") as weights:
        keys = list(weights.keys())
        assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
        tensors = [weights.get_tensor(k) for k in keys]
    assert {str(t.dtype) for t in tensors} == {"torch.float16"}
    assert sum(t.numel() for t in tensors) == METRICS["training"]["trainable_parameters"]


def test_the_adapter_loads_onto_builtin_testbed_and_changes_its_unet() -> None:
    assert METRICS["training"]["base"] == "builtin:testbed" and checkpoints.LORA_BASE == "testbed"
    pipe = load_base(BASE)
    before = _unet_output(pipe)
    pipe.load_lora_weights(str(FOLDER / ADAPTER_DIR))  # diffusers' own call, default weight name
    after = _unet_output(pipe)
    assert np.abs(after - before).max() > 0.05
    again = _unet_output(load_adapter(load_base(BASE), checkpoints.lora_testbed_adapter()))  # the file itself
    np.testing.assert_allclose(again, after, atol=1e-6)


def test_the_finetuning_set_shares_no_caption_or_image_with_the_base_dataset(items: list) -> None:
    base = base_items(BASE)
    assert not {i.caption for i in items} & {i.caption for i in base}
    assert not {i.image.tobytes() for i in items} & {i.image.tobytes() for i in base}
    closest = check_disjoint(items, base)
    assert closest > EXTRACTION_THRESHOLD  # no base image passes for a fine-tuning one
    assert closest == pytest.approx(METRICS["training"]["closest_base_image"], abs=1e-6)
    with pytest.raises(ValueError, match="shares .* captions"):  # the base's own seed: the same captions
        check_disjoint(finetune_items(LoraSpec(seed=0)), base)


def test_ground_truth_and_audit_prompts_agree_with_metrics(items: list) -> None:
    spec = recorded_spec(FOLDER)
    assert json.loads(json.dumps(spec.to_dict())) == METRICS["training"]["spec"]
    data = METRICS["training"]["spec"]["dataset"]
    groups = {int(k): n for k, n in data["duplicate_groups"].items()}
    assert max(groups) >= 16
    assert Counter(i.duplicates for i in items) == {**groups, 1: data["n_single"], 0: data["n_heldout"]}
    truth = pq.read_table(FOLDER / card.GROUND_TRUTH).to_pydict()
    assert truth["caption"] == [i.caption for i in items]
    assert truth["duplicates"] == [i.duplicates for i in items]
    assert truth["key"] == [i.key for i in items]
    prompts = (FOLDER / card.AUDIT_PROMPTS).read_text(encoding="utf-8").splitlines()
    by_caption = {i.caption: i.duplicates for i in items}
    assert set(prompts) <= set(by_caption) and len(set(prompts)) == len(prompts)
    wanted = {c for c, d in by_caption.items() if d != 1}  # every duplicated and every held-out caption
    assert wanted <= set(prompts)
    assert 0 < sum(by_caption[p] == 1 for p in prompts) < data["n_single"]  # and some singles
    path, fmt = resolve_source(PromptsSection(source="builtin:testbed-lora"))
    assert (path, fmt) == (FOLDER / card.AUDIT_PROMPTS, "txt")
    assert read_prompts(PromptsSection(source="builtin:testbed-lora")).prompts == prompts


def test_the_recorded_memorization_is_the_adapters() -> None:
    with_adapter = {g["group"]: g for g in METRICS["memorization"]["groups"]}
    without = {g["group"]: g for g in METRICS["memorization_without_adapter"]["groups"]}
    top = max(g["duplicates"] for g in with_adapter.values())
    assert with_adapter[f"dup{top}"]["extracted"] >= 0.75
    assert with_adapter["heldout"]["extracted"] == 0
    assert all(g["extracted"] == 0 for g in without.values())
    assert METRICS["training"]["seconds"] <= 15 * 60
    text = (FOLDER / card.CARD).read_text(encoding="utf-8")
    assert "builtin:testbed" in text and "load_lora_weights" in text and "Somepalli" in text


def test_reference_testbed_lora_writes_the_finetuning_set_with_its_duplicates(tmp_path: Path, items: list) -> None:
    from audit.cli import _parser

    args = _parser().parse_args(["reference", "testbed", str(tmp_path / "ref"), "--testbed", "lora"])
    assert checkpoints.SHIPPED_KINDS[args.testbed] == checkpoints.LORA_TESTBED
    table = pq.read_table(write_shipped_training_set(tmp_path, checkpoints.LORA_TESTBED)).to_pydict()
    captions = {i.caption for i in items}
    ours = [(k, c) for k, c in zip(table["key"], table["caption"]) if c in captions]
    assert len(ours) == sum(i.duplicates for i in items) == METRICS["training"]["entries_per_epoch"]
    assert Counter(item_key(k) for k, _ in ours) == {i.key: i.duplicates for i in items if i.duplicates}
    assert {c for _, c in ours} == {i.caption for i in items if i.duplicates}  # held-out pairs left out
    # any other row is one of the base testbed's training pairs (what base + adapter was trained on)
    others = [(k, c) for k, c in zip(table["key"], table["caption"]) if c not in captions]
    base = base_items(BASE)
    assert {c for _, c in others} <= {i.caption for i in base if i.duplicates}
    assert not {k for k, _ in others} & {k for k, _ in ours}
    glyphs = pq.read_table(write_shipped_training_set(tmp_path / "glyphs", "testbed"))  # unchanged
    assert glyphs.num_rows == sum(i.duplicates for i in base) == 600 + 2 * 16 + 8 * 16 + 32 * 16


def test_a_cheap_remeasure_matches_the_recorded_figures(items: list) -> None:
    """2 captions of the most duplicated group x 2 samples, with and without the adapter, at the
    recorded settings: the first samples of the recorded measurement, so the same distances."""
    memo, memo_base = METRICS["memorization"], METRICS["memorization_without_adapter"]
    top = max(i.duplicates for i in items)
    chosen = [i for i in items if i.duplicates == top][:2]
    own = np.stack([i.image for i in chosen])[:, None]
    settings = {"samples_per_caption": 2, "steps": memo["steps"], "seed": memo["seed"]}
    with_adapter = tiled_l2(generate_for(BASE / card.PIPELINE, chosen, adapter=FOLDER / ADAPTER_DIR, **settings), own)
    without = tiled_l2(generate_for(BASE / card.PIPELINE, chosen, **settings), own)
    assert (with_adapter.min(axis=1) < EXTRACTION_THRESHOLD).all()
    assert (without > EXTRACTION_THRESHOLD).all()
    recorded = np.array(memo["distances"][f"dup{top}"])[:2, :2]
    recorded_base = np.array(memo_base["distances"][f"dup{top}"])[:2, :2]
    np.testing.assert_allclose(with_adapter, recorded, atol=0.02)
    np.testing.assert_allclose(without, recorded_base, atol=0.02)


@pytest.mark.slow
def test_train_lora_command_writes_the_folder(tmp_path: Path) -> None:
    from audit.cli import main

    out = tmp_path / "lora"
    assert main(["testbed", "train-lora", str(out), "--steps", "3"]) == 0
    for name in (f"{ADAPTER_DIR}/pytorch_lora_weights.safetensors", card.GROUND_TRUTH, card.AUDIT_PROMPTS,
                 card.METRICS, card.CARD, card.EXAMPLES):
        assert (out / name).is_file(), name
    metrics = json.loads((out / card.METRICS).read_text())
    assert metrics["training"]["spec"]["steps"] == 3
    assert "memaudit testbed train-lora OUT --steps 3" in (out / card.CARD).read_text(encoding="utf-8")
    assert main(["testbed", "train-lora", str(out)]) == 2  # not an empty folder


@pytest.mark.slow  # ~20 s; the shipped adapter itself is checked by the tests above in every suite
def test_training_is_seeded_touches_only_the_lora_weights_and_is_packaged(tmp_path: Path) -> None:
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from audit.testbed.lora_package import WITHOUT_ADAPTER, train_and_package_lora

    out, spec = tmp_path / "lora", LoraSpec(steps=2, batch_size=4, warmup_steps=1)
    metrics = train_and_package_lora(out, spec, "memaudit testbed x", captions_per_group=1, samples_per_caption=1)
    again = train_lora(spec, BASE)  # the same spec trains the same adapter
    saved = load_file(out / ADAPTER_DIR / "pytorch_lora_weights.safetensors")
    trained = {f"unet.{k}": v for k, v in get_peft_model_state_dict(again.pipeline.unet).items()}
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], v.to(torch.float16)) for k, v in trained.items())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    unet, base = again.pipeline.unet.state_dict(), load_base(BASE).unet.state_dict()
    assert all(torch.equal(v, base[k.replace(".base_layer", "")]) for k, v in unet.items() if "lora_" not in k)
    assert again.log["trainable_parameters"] == METRICS["training"]["trainable_parameters"]

    assert json.loads((out / card.METRICS).read_text()) == metrics
    assert [g["group"] for g in metrics[WITHOUT_ADAPTER]["groups"]] == ["dup16", "dup4", "single", "heldout"]
    assert metrics["training"]["adapter"]["reload_max_abs_diff"] < 1e-3
    text = (out / card.CARD).read_text(encoding="utf-8")
    assert "`memaudit testbed x`" in text and text.count("| dup16 |") == 2
    # every caption of both duplicated groups and of the held-out ones, as many singles
    assert (out / card.AUDIT_PROMPTS).read_text(encoding="utf-8").count("\n") == 8 + 8 + 16 + 16
    assert (out / card.EXAMPLES).is_file() and (out / card.GROUND_TRUTH).is_file()
