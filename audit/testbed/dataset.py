"""The testbeds' training sets, built from data that ships with scikit-learn or matplotlib.

Two kinds, so that detection thresholds can be checked on a testbed they were not tuned on:

- ``"glyphs"`` (``builtin:testbed``): each image is a 32x32 crop of one of scikit-learn's sample
  photographs (``china.jpg``, ``flower.jpg``) with one handwritten digit of ``load_digits`` drawn
  over it in its own colour.
- ``"maps"`` (``builtin:testbed-maps``): crops of matplotlib's sample data — the elevation grids
  ``jacksboro_fault_dem.npz`` and ``topobathy.npz`` and the MRI slice ``s1045.ima.gz`` rendered
  through a random colormap, with or without random hill-shading, and the photo
  ``grace_hopper.jpg`` — at a random side and place, maybe flipped. About 8% are near-flat,
  low-contrast images instead (one random colour per image, a faint gradient and a grey level of
  noise): real training sets hold such images, and a detector must not call two flat images of
  nearby colours a copy. Crops that come out too close to an earlier one, near-flat by accident or
  busier than the small autoencoder can give back are drawn again.

In both kinds every image is distinct and, the maps kind's flat images aside (close to each other
by design), none is a near-copy of another. Each image has its own
caption, a random phrase that does not describe it (as web alt-text often does not), so a model
can only reproduce an image from its caption by having memorized the pair.

Ground truth by construction (Carlini et al. 2023: duplicated examples are the memorized ones):
some training pairs are repeated ``k`` times (the duplication groups), the rest appear once, and
held-out pairs are never trained on. Everything is a pure function of the spec and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from audit.similarity import tiled_l2

SPLIT_TRAIN = "train"
SPLIT_HELDOUT = "heldout"
KINDS = ("glyphs", "maps")

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
    kind: str = "glyphs"  # what the images are built from: one of KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown testbed dataset kind {self.kind!r}; one of {', '.join(KINDS)}")

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


# --- the "maps" kind ---------------------------------------------------------------------------

FLAT_SHARE = 0.08  # near-flat images among all images of the maps kind
# A crop whose grey level varies less than this (standard deviation on [0, 1]) is flat by accident
# (the MRI's black background, a plain patch of sea); it is drawn again, so that the only flat
# images are the ones placed on purpose.
MIN_CROP_CONTRAST = 0.05
# A crop with more fine detail than this (mean absolute 4-neighbour Laplacian on [0, 1] pixels) is
# drawn again: about the busiest glyph image (0.21), and beyond what the testbed's small
# autoencoder gives back within the extraction threshold, so such a pair could never be extracted.
MAX_CROP_DETAIL = 0.2
# A crop within this tiled L2 of an earlier image is drawn again: the evaluation's extraction
# threshold (Carlini et al.'s 0.15), so that no two training images count as copies of each other.
MIN_DISTANCE = 0.15
COLORMAPS = (
    "terrain", "gist_earth", "viridis", "magma", "ocean", "copper", "cividis", "plasma", "bone",
    "cubehelix", "YlGnBu", "inferno", "summer", "coolwarm", "gray", "pink",
)
_BLEND_MODES = ("overlay", "soft", "hsv")
# Where map crops come from, and how often: the large DEM most, the small topobathy grid least.
_SOURCES = ("dem", "topobathy", "mri", "photo")
_SOURCE_WEIGHTS = (0.35, 0.2, 0.2, 0.25)


def _sample_data() -> dict[str, np.ndarray]:
    """matplotlib's sample data as float32: three 2-D fields (two elevation grids and an MRI slice,
    any unit) and one RGB photo in [0, 1]. Paths, not matplotlib's own loaders, whose return
    types differ between versions."""
    import gzip

    from matplotlib import cbook

    def path(name: str) -> str:
        return str(cbook.get_sample_data(name, asfileobj=False))

    with np.load(path("jacksboro_fault_dem.npz")) as dem, np.load(path("topobathy.npz")) as topo:
        fields = {"dem": dem["elevation"].astype(np.float32), "topobathy": topo["topo"].astype(np.float32)}
    with gzip.open(path("s1045.ima.gz")) as raw:  # 256x256 uint16, big-endian, no header
        fields["mri"] = np.frombuffer(raw.read(), dtype=">u2").reshape(256, 256).astype(np.float32)
    with Image.open(path("grace_hopper.jpg")) as photo:
        fields["photo"] = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0
    return fields


def _random_crop(array: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A square crop of random side (from about ``size`` up to 4 x ``size`` or 60% of the shorter
    edge) at a random place, flipped left-right and/or upside down at random. Wider crops would
    pack more detail into ``size`` pixels than the testbed's small autoencoder can give back, and a
    pair it cannot reconstruct can never be extracted, duplicated or not."""
    shorter = min(array.shape[:2])
    side = int(rng.integers(min(size, shorter // 3), min(int(shorter * 0.6), 4 * size) + 1))
    top = int(rng.integers(0, array.shape[0] - side + 1))
    left = int(rng.integers(0, array.shape[1] - side + 1))
    crop = array[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return np.ascontiguousarray(crop)


def _render_field(field: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A 2-D crop as ``size x size`` RGB in [0, 1]: stretched to its own range, then through a random
    colormap, hill-shaded by a random light half the time (relief as maps show it)."""
    import matplotlib
    from matplotlib.colors import LightSource

    lo, hi = float(field.min()), float(field.max())
    unit = _resize(((field - lo) / max(hi - lo, 1e-6))[..., None], size)[..., 0]
    cmap = matplotlib.colormaps[str(rng.choice(COLORMAPS))]
    if rng.random() < 0.5:
        return cmap(unit)[..., :3]
    light = LightSource(azdeg=float(rng.uniform(0, 360)), altdeg=float(rng.uniform(20, 70)))
    shaded = light.shade(unit, cmap=cmap, blend_mode=str(rng.choice(_BLEND_MODES)),
                         vert_exag=float(rng.uniform(3, 15)))
    return np.clip(shaded[..., :3], 0.0, 1.0)


def _map_crop(sources: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """One candidate image of the maps kind, float RGB in [0, 1]."""
    name = _SOURCES[int(rng.choice(len(_SOURCES), p=_SOURCE_WEIGHTS))]
    crop = _random_crop(sources[name], size, rng)
    return _resize(crop, size) if crop.ndim == 3 else _render_field(crop, size, rng)


def _flat_image(size: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-flat image: ``colour`` (0-255) everywhere, plus a grey ramp of 1-4 levels across the
    image in a random direction and noise of about half a level, as scanned or compressed
    backgrounds have. Float RGB in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y) * rng.uniform(1, 4)
    noise = rng.normal(0, 0.5, (size, size))
    return (colour[None, None, :] + (ramp + noise)[..., None]) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def detail(image: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of a uint8 image on [0, 1]: how much fine detail it has."""
    x = image.astype(np.float32) / 255.0
    laplacian = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(np.abs(laplacian).mean())


def _acceptable(candidate: np.ndarray, earlier: np.ndarray) -> bool:
    """Whether a crop may join the dataset: not flat by accident, not too busy to reconstruct,
    and not a near-copy of any ``earlier`` image."""
    grey = candidate.astype(np.float32).mean(axis=-1) / 255.0
    if grey.std() < MIN_CROP_CONTRAST or detail(candidate) > MAX_CROP_DETAIL:
        return False
    return len(earlier) == 0 or float(tiled_l2(candidate, earlier).min()) >= MIN_DISTANCE


def is_flat(image: np.ndarray, levels: int = 12) -> bool:
    """Whether a uint8 image spans at most ``levels`` grey levels in every channel: the near-flat
    images of the maps kind do (a few levels), its crops never do (their contrast is checked)."""
    span = image.reshape(-1, image.shape[-1]).astype(np.int16)
    return bool((span.max(axis=0) - span.min(axis=0)).max() <= levels)


def map_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct ``size x size`` RGB images of the maps kind, uint8: ``FLAT_SHARE`` of them
    near-flat (at random places, each its own colour), the rest crops of matplotlib's sample data,
    each at least ``MIN_DISTANCE`` (tiled L2) from every image before it (see ``_acceptable``)."""
    sources = _sample_data()
    flat = set(rng.choice(n, int(round(FLAT_SHARE * n)), replace=False).tolist())
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    colours: set[tuple[int, ...]] = set()
    for i in range(n):
        if i in flat:
            colour = tuple(int(c) for c in rng.integers(24, 232, 3))
            while colour in colours:
                colour = tuple(int(c) for c in rng.integers(24, 232, 3))
            colours.add(colour)
            out[i] = _to_uint8(_flat_image(size, np.array(colour, dtype=np.float64), rng))
            continue
        candidate = _to_uint8(_map_crop(sources, size, rng))
        while not _acceptable(candidate, out[:i]):
            candidate = _to_uint8(_map_crop(sources, size, rng))
        out[i] = candidate
    return out


MAPS = DatasetSpec(n_single=400, duplicate_groups={48: 12, 16: 12, 4: 12}, n_heldout=48, kind="maps")
"""The maps testbed's sizes (``memaudit testbed train --kind maps``): fewer, more duplicated pairs."""


def dataset_spec(kind: str) -> DatasetSpec:
    """The dataset of a testbed kind: ``glyphs`` (the shipped ``builtin:testbed``) or ``maps``."""
    if kind not in KINDS:
        raise ValueError(f"unknown testbed dataset kind {kind!r}; one of {', '.join(KINDS)}")
    return MAPS if kind == "maps" else DatasetSpec()


def _dataset_rng(kind: str, seed: int) -> np.random.Generator:
    """The random stream a dataset is drawn from: the seed alone for glyphs (as the shipped
    testbed was built), the seed and the kind for any other kind, so that two testbeds of one seed
    share no captions (a run's prompts, or ground truth, can never pass for the other testbed's)."""
    if kind == "glyphs":
        return np.random.default_rng(seed)
    return np.random.default_rng([seed, KINDS.index(kind)])


def build_dataset(spec: DatasetSpec, seed: int = 0) -> list[TestbedItem]:
    """All pairs: duplication groups (largest k first), singles, then held-out."""
    rng = _dataset_rng(spec.kind, seed)
    texts = captions(spec.n_images, rng)
    pixels = (map_images if spec.kind == "maps" else images)(spec.n_images, spec.size, rng)
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
