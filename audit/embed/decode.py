"""Decoding web images robustly: every input becomes an RGB image or a recorded reason.

Web-scraped reference sets hold zero-byte files, truncated downloads, HTML error pages saved as
``.jpg``, CMYK JPEGs, 16-bit PNGs, palette images with transparency and decompression bombs. None
of them may crash a worker: failures become ``error`` rows whose reason starts with a short code
(``zero_byte``, ``missing``, ``corrupt``, ``truncated``, ``too_large``); images that decode after
a conversion are ``ok`` with a ``note`` saying what was converted.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; larger is a decompression bomb here


@dataclass(frozen=True)
class Decoded:
    """One decoded image (RGB) or the reason there is none."""

    image: Image.Image | None
    error: str | None = None
    note: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``data`` into an RGB image without ever raising for bad bytes.

    The size is checked from the header before any pixel is decoded, so a bomb costs nothing.
    Transparent images are composited on white (what a browser shows, and what a copy of the
    picture looks like once flattened).
    """
    if data is None:
        return Decoded(None, "missing: no image bytes in this row")
    if len(data) == 0:
        return Decoded(None, "zero_byte: the image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return Decoded(None, f"too_large: {width}x{height} = {width * height} pixels exceeds "
                                     f"the limit of {max_pixels} (decompression bomb guard)", None, width, height)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Decoded(None, f"too_large: {exc}")
    except OSError as exc:
        text = str(exc)
        code = "truncated" if "truncat" in text.lower() or "broken data stream" in text.lower() else "corrupt"
        return Decoded(None, f"{code}: {text}")
    except (ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        return Decoded(None, f"corrupt: {type(exc).__name__}: {exc}")
    try:
        rgb, note = to_rgb(image)
    except (OSError, ValueError) as exc:
        return Decoded(None, f"corrupt: cannot convert mode {image.mode}: {exc}", None, width, height)
    return Decoded(rgb, None, note, width, height)


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; the note says what was converted (None for RGB)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(values.max()), 1.0)
        if mode == "F":
            top = 1.0 if values.max() <= 1.0 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        depth = "16-bit" if "16" in mode else "high bit depth"
        return Image.fromarray(gray, "L").convert("RGB"), f"converted {mode} ({depth}) to 8-bit RGB"
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "P+transparency"
    if image.mode in {"RGBA", "LA", "PA", "La", "RGBa"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"composited {mode} on white"
    return image.convert("RGB"), f"converted {mode} to RGB"
