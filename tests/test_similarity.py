"""Carlini et al.'s tiled L2 on known images."""

from __future__ import annotations

import numpy as np
import pytest

from audit.similarity import rms_l2, tile_structure, tiled_l2


def test_identical_images_are_at_zero_and_uint8_equals_float() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.allclose(tiled_l2(a, a), 0)
    b = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.allclose(tiled_l2(a, b), tiled_l2(a / 255.0, b / 255.0), atol=1e-6)


def test_one_bad_tile_decides() -> None:
    a = np.zeros((32, 32, 3), np.float32)
    b = a.copy()
    b[:8, :8] = 1.0  # one of 16 tiles fully wrong
    assert tiled_l2(a, b) == pytest.approx(1.0)
    assert rms_l2(a, b) == pytest.approx(np.sqrt(1 / 16))  # diluted over the whole image


def test_uniform_offset_and_broadcasting() -> None:
    a = np.full((4, 1, 16, 16, 3), 0.5, np.float32)
    b = np.full((4, 3, 16, 16, 3), 0.6, np.float32)
    d = tiled_l2(a, b)
    assert d.shape == (4, 3) and np.allclose(d, 0.1, atol=1e-6)


def test_shapes_that_do_not_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="do not split into 4x4 tiles"):
        tiled_l2(np.zeros((30, 30, 3)), np.zeros((30, 30, 3)))


def test_structure_bounds_what_tiled_l2_can_tell_apart() -> None:
    """Per tile, ||a - b|| <= ||mean colours apart|| + structure(a) + structure(b): images whose
    structures sum below a threshold differ under it by their tile colours alone (docs/calibration.md)."""
    rng = np.random.default_rng(1)
    flat = np.full((32, 32, 3), 0.3, np.float32)
    assert tile_structure(flat) == pytest.approx(0.0, abs=1e-7)
    checker = np.indices((32, 32)).sum(axis=0) % 2
    assert tile_structure(np.repeat(checker[..., None], 3, axis=-1).astype(np.float32)) == pytest.approx(0.5)
    for _ in range(20):
        a, b = rng.random((2, 32, 32, 3), dtype=np.float32) * rng.random(2)[:, None, None, None]
        tile_means = [x.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3), keepdims=True) for x in (a, b)]
        colours = tiled_l2(*(np.broadcast_to(m, (4, 8, 4, 8, 3)).reshape(32, 32, 3) for m in tile_means))
        assert tiled_l2(a, b) <= colours + tile_structure(a) + tile_structure(b) + 1e-6
    assert tile_structure(rng.random((5, 16, 16, 3))).shape == (5,)
