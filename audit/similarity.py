"""Pixel-space similarity of images (Carlini et al. 2023, Webster 2023). Pure numpy."""

from __future__ import annotations

import numpy as np


def _unit(images: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] or floats in [0, 1] -> float32 in [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def tiled_l2(a: np.ndarray, b: np.ndarray, grid: int = 4) -> np.ndarray:
    """Carlini et al.'s distance: split both images into ``grid x grid`` non-overlapping tiles,
    take the root-mean-square pixel difference of each tile (L2 normalised by the square root of
    its number of values, on [0, 1] pixels) and return the largest. A copy must match everywhere,
    so one bad tile is enough to make two images different.

    ``a`` and ``b`` are ``(..., H, W, C)`` arrays that broadcast against each other; H and W must
    be multiples of ``grid``. Returns the distances with shape ``(...)``.
    """
    x, y = _unit(a), _unit(b)
    height, width = x.shape[-3], x.shape[-2]
    if height % grid or width % grid or y.shape[-3:] != x.shape[-3:]:
        raise ValueError(f"images of shape {x.shape[-3:]} and {y.shape[-3:]} do not split into {grid}x{grid} tiles")
    diff = (x - y) ** 2
    tiles = diff.reshape(*diff.shape[:-3], grid, height // grid, grid, width // grid, diff.shape[-1])
    per_tile = np.sqrt(tiles.mean(axis=(-4, -2, -1)))
    return per_tile.max(axis=(-2, -1))


def rms_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whole-image root-mean-square difference on [0, 1] pixels (``tiled_l2`` with one tile)."""
    return tiled_l2(a, b, grid=1)
