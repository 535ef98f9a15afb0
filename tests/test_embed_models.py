"""Embedding models load through their own libraries (open_clip, TorchScript) from disk, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from audit.config import EmbeddingSection
from audit.embed.models import load_embedder, model_id_of
from audit.embed.embedding import EmbedStage
from audit.errors import InputError
from images import bad_and_odd_images, encode, photo

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip CLIP saved as a local-dir model (config JSON + safetensors weights)."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open_clip") / "tiny-clip"
    folder.mkdir()
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


class TinyCopyDetector(torch.nn.Module):
    """Stands in for SSCD's architecture class: a conv net saved with torch.jit.script."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_open_clip_local_dir_model_loads_and_embeds(tiny_open_clip: Path) -> None:
    section = EmbeddingSection(kind="open_clip", model=f"local-dir:{tiny_open_clip}", device="cpu")
    embedder = load_embedder(section)
    assert embedder.dim == 32 and embedder.model_id == model_id_of(section)
    rows = embedder.embed_images([photo(1), photo(2), photo(1)])
    assert rows.shape == (3, 32)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    assert np.allclose(rows[0], rows[2], atol=1e-6) and not np.allclose(rows[0], rows[1], atol=1e-3)


def test_open_clip_model_name_with_a_local_safetensors_file(tiny_open_clip: Path, tmp_path: Path) -> None:
    import open_clip

    config = tmp_path / "memaudit-tiny-clip.json"  # open_clip names a registered config by its file stem
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    weights = tiny_open_clip / "open_clip_model.safetensors"
    by_name = load_embedder(EmbeddingSection(kind="open_clip", model="memaudit-tiny-clip", pretrained=str(weights),
                                             device="cpu"))
    by_dir = load_embedder(EmbeddingSection(kind="open_clip", model=f"local-dir:{tiny_open_clip}", device="cpu"))
    assert "open_clip_model.safetensors@" in by_name.model_id
    pixels = torch.rand(2, 3, 32, 32)
    assert np.allclose(by_name.embed(pixels), by_dir.embed(pixels), atol=1e-5)  # same weights loaded


def test_open_clip_pickle_weights_are_refused_without_opt_in(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not loaded")
    section = EmbeddingSection(kind="open_clip", model="ViT-B-32", pretrained=str(weights), device="cpu")
    with pytest.raises(InputError, match="pickle-based.*allow_pickle"):
        load_embedder(section)


def test_torchscript_copy_detector_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "detector.pt"
    torch.manual_seed(0)
    torch.jit.script(TinyCopyDetector()).save(str(path))
    section = EmbeddingSection(kind="torchscript", model=str(path), image_size=40, device="cpu")
    embedder = load_embedder(section)
    assert embedder.dim == 24 and embedder.model_id.startswith("torchscript:detector.pt:")
    rows = embedder.embed_images([photo(3, size=64), photo(4, size=20)])
    assert rows.shape == (2, 24) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)


def test_missing_or_invalid_torchscript_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_embedder(EmbeddingSection(kind="torchscript", model=str(tmp_path / "nope.pt")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a TorchScript file"):
        load_embedder(EmbeddingSection(kind="torchscript", model=str(junk)))


def test_builtin_testbed_descriptor_finds_copies() -> None:
    embedder = load_embedder(EmbeddingSection())
    a, b = photo(10), photo(11)
    shifted = np.asarray(a).astype(int) + 12  # same picture, brighter: still a copy
    from PIL import Image

    rows = embedder.embed_images([a, Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)), b])
    assert rows.shape == (3, 768)
    assert float(rows[0] @ rows[1]) > 0.99 > float(rows[0] @ rows[2])


def test_stage_embeds_good_rows_and_records_bad_ones() -> None:
    stage = EmbedStage(EmbeddingSection(device="cpu", batch_size=3))
    cases = bad_and_odd_images()
    names = ["good", *sorted(cases), "good2"]
    data = [encode(photo(20), "PNG"), *(cases[n][0] for n in sorted(cases)), encode(photo(21), "JPEG")]
    out = stage({"image": np.array(data, dtype=object)})
    assert out["embedding"].dtype == np.float16 and out["embedding"].shape == (len(data), 768)
    for i, name in enumerate(names):
        expected = None if name.startswith("good") else cases[name][1]
        if expected is None:
            assert out["status"][i] == "ok", (name, out["error"][i])
            assert abs(np.linalg.norm(out["embedding"][i].astype(np.float32)) - 1) < 1e-2
        else:
            assert out["status"][i] == "error" and out["error"][i].startswith(expected), name
            assert not out["embedding"][i].any()
