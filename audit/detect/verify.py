"""Verifying candidate pairs on pixels and copy embeddings, with Webster's labels (Ray-free).

A pair is (generated sample, retrieved reference image). Both are brought to a common size (the
smaller of the two, at most ``verify_size``, a multiple of the tile grid), compared with
Carlini's tiled L2 and plain RMS, and by copy-embedding cosine and split-product. Labels, with
the thresholds of :mod:`audit.detect.thresholds` (calibrated on the reference, or the papers'):

- ``low_information`` (calibrated thresholds only): the two images' structures
  (:func:`audit.similarity.tile_structure`) sum to less than the tiled-L2 threshold, so the pixel
  comparison can only tell their mean colours apart: never called a copy;
- ``matching_verbatim``: pixel copy (tiled L2 below the threshold) of the prompt's own training
  image (the reference item whose caption is the prompt, or whose key is the prompt's key);
- ``retrieved_verbatim``: pixel copy of another training image;
- ``template_verbatim``: not a pixel copy, but the copy descriptor matches (split-product at or
  above its threshold): same layout, other details;
- ``none``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from audit.config import DetectionSection
from audit.detect.thresholds import Thresholds
from audit.ids import normalize_prompt
from audit.similarity import common_size, cosine, pixels_at, rms_l2, split_product, tile_structure, tiled_l2

MATCHING, RETRIEVED, TEMPLATE, NONE = "matching_verbatim", "retrieved_verbatim", "template_verbatim", "none"
LOW_INFORMATION = "low_information"
LABEL_ORDER = {MATCHING: 4, RETRIEVED: 3, TEMPLATE: 2, LOW_INFORMATION: 1, NONE: 0}


def is_own(prompt: str, prompt_key: str | None, ref_caption: str | None, ref_key: str | None) -> bool:
    if prompt_key is not None and ref_key is not None and prompt_key == ref_key:
        return True
    return ref_caption is not None and normalize_prompt(ref_caption) == normalize_prompt(prompt)


def is_low_information(structure_sum: float, thresholds: Thresholds) -> bool:
    """Too little structure between the two images for a pixel comparison to mean a copy."""
    return thresholds.low_information and structure_sum < thresholds.match_l2


def label(measures: dict[str, float], own: bool, thresholds: Thresholds) -> str:
    """Webster's label of one measured pair (``compare``'s output)."""
    if is_low_information(measures["structure_sum"], thresholds):
        return LOW_INFORMATION
    if measures["tiled_l2"] < thresholds.match_l2:
        return MATCHING if own else RETRIEVED
    if measures["split_product"] >= thresholds.template_similarity:
        return TEMPLATE
    return NONE


def compare(sample_png: bytes, reference_png: bytes, sample_emb: np.ndarray, reference_emb: np.ndarray,
            cfg: DetectionSection) -> dict[str, float]:
    """Pixel and embedding measures of one pair."""
    a = Image.open(io.BytesIO(sample_png))
    b = Image.open(io.BytesIO(reference_png))
    side = common_size(a.size, b.size, cfg.verify_size, cfg.tile_grid)
    x, y = pixels_at(sample_png, side), pixels_at(reference_png, side)
    return {
        "tiled_l2": float(tiled_l2(x, y, cfg.tile_grid)),
        "rms": float(rms_l2(x, y)),
        "cosine": float(cosine(sample_emb, reference_emb)),
        "split_product": float(split_product(sample_emb, reference_emb, cfg.split_chunks)),
        "structure_sum": float(tile_structure(x, cfg.tile_grid) + tile_structure(y, cfg.tile_grid)),
        "size": float(side),
    }
