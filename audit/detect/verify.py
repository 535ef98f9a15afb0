"""Verifying candidate pairs on pixels and copy embeddings, with Webster's labels (Ray-free).

A pair is (generated sample, retrieved reference image). Both are brought to a common size (the
smaller of the two, at most ``verify_size``, a multiple of the tile grid), compared with
Carlini's tiled L2 and plain RMS, and by copy-embedding cosine and split-product. Labels:

- ``matching_verbatim``: pixel copy (tiled L2 < ``match_l2``) of the prompt's own training image
  (the reference item whose caption is the prompt, or whose key is the prompt's key);
- ``retrieved_verbatim``: pixel copy of another training image;
- ``template_verbatim``: not a pixel copy, but the copy descriptor matches (split-product >=
  ``template_similarity``): same layout, other details;
- ``none``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from audit.config import DetectionSection
from audit.ids import normalize_prompt
from audit.similarity import cosine, rms_l2, split_product, tiled_l2

MATCHING, RETRIEVED, TEMPLATE, NONE = "matching_verbatim", "retrieved_verbatim", "template_verbatim", "none"
LABEL_ORDER = {MATCHING: 3, RETRIEVED: 2, TEMPLATE: 1, NONE: 0}


def common_size(a: tuple[int, int], b: tuple[int, int], limit: int, grid: int) -> int:
    side = min(min(a), min(b), limit)
    return max(grid, side - side % grid)


def pixels(png: bytes, side: int) -> np.ndarray:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(image)


def is_own(prompt: str, prompt_key: str | None, ref_caption: str | None, ref_key: str | None) -> bool:
    if prompt_key is not None and ref_key is not None and prompt_key == ref_key:
        return True
    return ref_caption is not None and normalize_prompt(ref_caption) == normalize_prompt(prompt)


def label(tiled: float, split: float, own: bool, cfg: DetectionSection) -> str:
    if tiled < cfg.match_l2:
        return MATCHING if own else RETRIEVED
    if split >= cfg.template_similarity:
        return TEMPLATE
    return NONE


def compare(sample_png: bytes, reference_png: bytes, sample_emb: np.ndarray, reference_emb: np.ndarray,
            cfg: DetectionSection) -> dict[str, float]:
    """Pixel and embedding measures of one pair."""
    a = Image.open(io.BytesIO(sample_png))
    b = Image.open(io.BytesIO(reference_png))
    side = common_size(a.size, b.size, cfg.verify_size, cfg.tile_grid)
    x, y = pixels(sample_png, side), pixels(reference_png, side)
    return {
        "tiled_l2": float(tiled_l2(x, y, cfg.tile_grid)),
        "rms": float(rms_l2(x, y)),
        "cosine": float(cosine(sample_emb, reference_emb)),
        "split_product": float(split_product(sample_emb, reference_emb, cfg.split_chunks)),
        "size": float(side),
    }
