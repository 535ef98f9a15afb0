"""Image files of every kind a web crawl holds, good and bad, as bytes (shared by tests)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(seed: int, size: int = 32) -> Image.Image:
    """A smooth random picture (distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (3.6e9 by default) over a few bytes of
    data: decoding it would need gigabytes."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def bad_and_odd_images() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected error code or None when it must decode with a conversion note)."""
    good_jpeg = encode(photo(1), "JPEG", quality=90)
    palette = photo(2).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16))
    return {
        "zero_byte": (b"", "zero_byte"),
        "html_error_page": (b"<html><body>404 Not Found</body></html>", "corrupt"),
        "random_bytes": (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "corrupt"),
        "truncated_jpeg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "truncated_png": (encode(photo(3), "PNG")[:-40], "truncated"),
        "decompression_bomb": (bomb_png(), "too_large"),
        "cmyk_jpeg": (encode(photo(4).convert("CMYK"), "JPEG"), None),
        "png_16_bit": (encode(sixteen, "PNG"), None),
        "palette_transparency": (encode(palette, "PNG"), None),
        "rgba_png": (encode(photo(5).convert("RGBA"), "PNG"), None),
        "grey_alpha_png": (encode(photo(6).convert("LA"), "PNG"), None),
    }
