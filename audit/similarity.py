"""Pixel-space similarity of images (Carlini et al. 2023, Webster 2023): numpy, and PIL to bring
two images to the common size they are compared at."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def common_size(a: tuple[int, int], b: tuple[int, int], limit: int, grid: int) -> int:
    """The side two images of sizes ``a`` and ``b`` are compared at: the smaller of their sides,
    at most ``limit``, a multiple of the tile grid."""
    side = min(min(a), min(b), limit)
    return max(grid, side - side % grid)


def pixels_at(png: bytes, side: int) -> np.ndarray:
    """An encoded image as ``(side, side, 3)`` uint8 RGB (bicubic resize when its size differs)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(image)


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


def tile_structure(images: np.ndarray, grid: int = 4) -> np.ndarray:
    """How much an image holds beyond a flat colour per tile: the largest, over the ``grid x grid``
    tiles, root-mean-square deviation of the tile's pixels from the tile's mean colour, on [0, 1].

    Within a tile the squared difference of two images splits exactly into the difference of
    their mean colours and the difference of their deviations from them (the two parts are
    orthogonal), and the deviations differ by at most the sum of their sizes. So when two
    images' structures add up to less than a tiled-L2 threshold, the threshold can no longer tell
    them apart by anything but their 4x4 mean colours: a flat navy image and a flat purple one,
    or two dark low-contrast photos (docs/calibration.md, "Low-information images").
    ``images`` is ``(..., H, W, C)``; returns ``(...)``."""
    x = _unit(images)
    height, width = x.shape[-3], x.shape[-2]
    if height % grid or width % grid:
        raise ValueError(f"images of shape {x.shape[-3:]} do not split into {grid}x{grid} tiles")
    tiles = x.reshape(*x.shape[:-3], grid, height // grid, grid, width // grid, x.shape[-1])
    deviation = tiles - tiles.mean(axis=(-4, -2), keepdims=True)
    per_tile = np.sqrt((deviation**2).mean(axis=(-4, -2, -1)))
    return per_tile.max(axis=(-2, -1))


def rms_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whole-image root-mean-square difference on [0, 1] pixels (``tiled_l2`` with one tile)."""
    return tiled_l2(a, b, grid=1)


def pairwise_tiled_l2(images: np.ndarray, grid: int = 4, block: int = 64) -> np.ndarray:
    """Tiled L2 between every pair of ``images`` (n, H, W, C): an (n, n) symmetric matrix.

    Uses per-tile squared norms and dot products (one matrix product per tile), so n = 500
    samples of 512x512 cost 16 GEMMs rather than 125k image differences; ``block`` rows at a
    time bound the memory. On a GPU, detection uses the same computation in torch
    (:func:`audit.detect.gpu.pairwise_tiled_l2_torch`).
    """
    x = _unit(images)
    n, height, width, channels = x.shape
    if height % grid or width % grid:
        raise ValueError(f"images of shape {x.shape[1:]} do not split into {grid}x{grid} tiles")
    tiles = x.reshape(n, grid, height // grid, grid, width // grid, channels).transpose(1, 3, 0, 2, 4, 5)
    tiles = tiles.reshape(grid * grid, n, -1)  # (tiles, n, values per tile)
    per_tile_values = tiles.shape[-1]
    norms = (tiles**2).sum(-1)  # (tiles, n)
    out = np.zeros((n, n), np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        dots = np.einsum("tiv,tjv->tij", tiles[:, start:stop], tiles)
        sq = norms[:, start:stop, None] + norms[:, None, :] - 2 * dots
        out[start:stop] = np.sqrt(np.maximum(sq, 0) / per_tile_values).max(axis=0)
    np.fill_diagonal(out, 0.0)
    return np.maximum(out, out.T)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows of ``a`` and ``b`` (broadcasting over leading dimensions)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    num = (a32 * b32).sum(-1)
    den = np.linalg.norm(a32, axis=-1) * np.linalg.norm(b32, axis=-1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def split_product(a: np.ndarray, b: np.ndarray, chunks: int = 16, min_energy: float = 0.25) -> np.ndarray:
    """Somepalli et al.'s split-product: split both embeddings into ``chunks`` equal parts, take
    the cosine of each pair of parts, return the largest. A copied object fills only some of a
    descriptor's parts (for spatially ordered descriptors, some tiles), which full-vector cosine
    averages away. A part counts only where it holds at least ``min_energy / chunks`` of both
    vectors' energy, so near-empty parts (flat background) cannot match by chance.
    ``a`` and ``b`` are ``(..., dim)`` and broadcast; dim must divide by chunks."""
    dim = a.shape[-1]
    if dim % chunks:
        raise ValueError(f"embedding dim {dim} does not split into {chunks} equal chunks")
    pa = a.astype(np.float32).reshape(*a.shape[:-1], chunks, dim // chunks)
    pb = b.astype(np.float32).reshape(*b.shape[:-1], chunks, dim // chunks)
    energy_a = (pa**2).sum(-1) / np.maximum((pa**2).sum((-2, -1))[..., None], 1e-12)
    energy_b = (pb**2).sum(-1) / np.maximum((pb**2).sum((-2, -1))[..., None], 1e-12)
    usable = (energy_a >= min_energy / chunks) & (energy_b >= min_energy / chunks)
    return np.where(usable, cosine(pa, pb), 0.0).max(axis=-1)
