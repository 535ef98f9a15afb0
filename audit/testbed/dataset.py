"""The testbed's training set, built from images that ship with scikit-learn.

Each image is a 32x32 crop of one of scikit-learn's sample photographs (``china.jpg``,
``flower.jpg``) with one handwritten digit of ``load_digits`` drawn over it in its own colour, so
every image is distinct and none is a near-copy of another. Each image has its own caption, a
random phrase that does not describe it (as web alt-text often does not), so a model can only
reproduce an image from its caption by having memorized the pair.

Ground truth by construction (Carlini et al. 2023: duplicated examples are the memorized ones):
some training pairs are repeated ``k`` times (the duplication groups), the rest appear once, and
held-out pairs are never trained on. Everything is a pure function of the spec and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SPLIT_TRAIN = "train"
SPLIT_HELDOUT = "heldout"

_ADJECTIVES = (
    "quiet", "golden", "rusty", "frozen", "velvet", "hollow", "crimson", "ancient", "paper", "silent",
    "electric", "misty", "wooden", "glass", "copper", "lonely", "bright", "stormy", "tiny", "giant",
    "marble", "neon", "faded", "wild", "gentle", "broken", "silver", "painted", "hidden", "woolen",
)
_NOUNS = (
    "lantern", "teapot", "fox", "bicycle", "cathedral", "violin", "harbor", "owl", "umbrella", "clock",
    "garden", "rocket", "sailboat", "mountain", "typewriter", "castle", "whale", "bridge", "kite", "piano",
    "tractor", "lighthouse", "cactus", "robot", "staircase", "balloon", "tiger", "carousel", "telescope", "mailbox",
)
_PLACES = (
    "desert", "forest", "city", "village", "meadow", "canyon", "island", "harbor", "market", "station",
    "library", "rooftop", "valley", "glacier", "orchard", "alley", "museum", "beach", "swamp", "plateau",
)
_STYLES = (
    "oil painting", "pencil sketch", "polaroid photo", "watercolor", "studio photograph", "linocut print",
    "vintage postcard", "film still", "pixel art", "charcoal drawing", "digital render", "gouache",
)
_RELATIONS = ("near", "above", "inside", "behind", "beside", "under", "beyond", "across")


@dataclass(frozen=True)
class DatasetSpec:
    """How many pairs of each kind; the duplication groups map k -> number of pairs repeated k times."""

    n_single: int = 600
    duplicate_groups: dict[int, int] = field(default_factory=lambda: {2: 16, 8: 16, 32: 16})
    n_heldout: int = 64
    size: int = 32

    @property
    def n_images(self) -> int:
        return self.n_single + sum(self.duplicate_groups.values()) + self.n_heldout


@dataclass(frozen=True)
class TestbedItem:
    """One image-caption pair and its ground truth."""

    index: int
    caption: str
    image: np.ndarray  # (size, size, 3) uint8
    split: str  # "train" or "heldout"
    duplicates: int  # times the pair occurs in the training set (0 for held-out)

    @property
    def key(self) -> str:
        return f"{self.index:06d}"


def captions(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct random phrases."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        a, b = rng.choice(_ADJECTIVES, 2, replace=False)
        article = "an" if a[0] in "aeiou" else "a"
        text = (
            f"{article} {a} {rng.choice(_NOUNS)} {rng.choice(_RELATIONS)} the {b} {rng.choice(_PLACES)}, "
            f"{rng.choice(_STYLES)}"
        )
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct ``size x size`` RGB images: photo crop + coloured digit, uint8."""
    from sklearn.datasets import load_digits, load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    glyphs = load_digits().images.astype(np.float32) / 16.0
    if n > len(glyphs):
        raise ValueError(f"at most {len(glyphs)} images (one digit glyph each), asked for {n}")
    order = rng.permutation(len(glyphs))[:n]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, glyph_index in enumerate(order):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(size * 2, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        crop = _resize(photo[top : top + side, left : left + side], size)
        glyph_side = int(rng.integers(size // 2, size - 3))
        mask = np.zeros((size, size), dtype=np.float32)
        y, x = (int(v) for v in rng.integers(0, size - glyph_side + 1, 2))
        mask[y : y + glyph_side, x : x + glyph_side] = _resize(glyphs[glyph_index][..., None], glyph_side)[..., 0]
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        mixed = crop * (1 - mask[..., None]) + colour * mask[..., None]
        out[i] = np.clip(np.round(mixed * 255), 0, 255).astype(np.uint8)
    return out


def _resize(array: np.ndarray, side: int) -> np.ndarray:
    channels = [
        np.asarray(Image.fromarray(array[..., c]).resize((side, side), Image.Resampling.BICUBIC))
        for c in range(array.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def build_dataset(spec: DatasetSpec, seed: int = 0) -> list[TestbedItem]:
    """All pairs: duplication groups (largest k first), singles, then held-out."""
    rng = np.random.default_rng(seed)
    texts = captions(spec.n_images, rng)
    pixels = images(spec.n_images, spec.size, rng)
    counts: list[int] = []
    for k in sorted(spec.duplicate_groups, reverse=True):
        counts += [k] * spec.duplicate_groups[k]
    counts += [1] * spec.n_single + [0] * spec.n_heldout
    return [
        TestbedItem(i, texts[i], pixels[i], SPLIT_TRAIN if k else SPLIT_HELDOUT, k)
        for i, k in enumerate(counts)
    ]


def training_entries(items: list[TestbedItem]) -> list[int]:
    """Indices of the training set with duplicates repeated: what an epoch iterates over."""
    return [item.index for item in items for _ in range(item.duplicates)]
