"""Robust decoding: every bad or odd image becomes RGB or a recorded reason, never an exception."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audit.embed.decode import decode_image
from images import bad_and_odd_images, encode, photo

CASES = bad_and_odd_images()


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_kind_of_image_decodes_or_gets_a_reason(name: str) -> None:
    data, expected_error = CASES[name]
    decoded = decode_image(data)
    if expected_error is None:
        assert decoded.ok, decoded.error
        assert decoded.image.mode == "RGB" and decoded.image.size == (32, 32)
        assert decoded.note, "a converted image records what was converted"
    else:
        assert not decoded.ok
        assert decoded.error.split(":")[0] == expected_error, decoded.error


def test_plain_rgb_decodes_without_a_note_and_keeps_pixels() -> None:
    image = photo(7)
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.ok and decoded.note is None
    assert np.array_equal(np.asarray(decoded.image), np.asarray(image))


def test_conversions_keep_the_picture() -> None:
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert np.asarray(decode_image(encode(sixteen, "PNG")).image).min() == 255  # white stays white, not clipped
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(clear, "PNG")).image).min() == 255  # transparent -> white background


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = encode(photo(8, size=64), "PNG")
    assert decode_image(data, max_pixels=64 * 64).ok
    refused = decode_image(data, max_pixels=64 * 64 - 1)
    assert refused.error.startswith("too_large") and (refused.width, refused.height) == (64, 64)
