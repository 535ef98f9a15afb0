"""Pixels to bytes: lossless PNG for the sample, a small PNG thumbnail for reports."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """NCHW floats in [0, 1] -> (NHWC uint8 on the CPU, per-image 'all pixels finite' flags).

    Rounding matches diffusers' own ``numpy_to_pil`` (round half to even of x * 255)."""
    flat = images.detach().flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    clean = torch.nan_to_num(images.detach().float(), nan=0.0).clamp(0, 1)
    pixels = (clean * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return pixels.cpu().numpy(), finite.cpu().numpy()


def encode_png(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG of an HWC uint8 RGB image."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_thumbnail(pixels: np.ndarray, size: int) -> bytes | None:
    """PNG thumbnail whose longest side is at most ``size`` (None when ``size`` is 0)."""
    if size <= 0:
        return None
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return encode_png(np.asarray(image), compress_level=6)


def decode_png(data: bytes) -> np.ndarray:
    """HWC uint8 pixels of a PNG."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
