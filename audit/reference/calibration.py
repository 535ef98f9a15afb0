"""Calibrating detection on the training set itself: what distinct training images look like to
the detector (``memaudit reference calibrate REF``; Ray-free).

Every threshold of a copy detector is a statement about how close two *different* images can
come. The papers' constants (Carlini et al.'s tiled L2 0.15 at 512², Somepalli et al.'s
split-product 0.5 with SSCD) hold for their embedder, resolution and images only; Somepalli et al.
compare generated→train similarities with the train→train distribution of the same set. This
module measures that distribution, the null of "no copy": for a seeded sample of training images,
their ``verify_top`` nearest *distinct* training images in the reference's own index (items with
cosine >= ``reference.dup_threshold`` are the image's near-duplicates, as ``dups`` counts them,
and are skipped), compared exactly as detection compares a sample with its neighbours
(docs/calibration.md): copy-embedding cosine and split-product, pixel tiled L2 and RMS at the
verification size, and each image's structure (:func:`audit.similarity.tile_structure`).

Written to ``REF/calibration/``: ``null.parquet`` (one row per sampled image, the measures of its
pairs) and ``calibration.json`` (written last: the settings it is valid for, the index it was
measured on, counts). A calibration is valid only for the embedder, verification size, tile grid,
split chunks and neighbours verified that made it; anything else is refused
(:func:`load_calibration`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from audit.config import DetectionSection, ReferenceSection
from audit.errors import InputError
from audit.files import write_bytes_atomic, write_parquet_atomic
from audit.progress import Progress
from audit.reference.images import ReferenceImages
from audit.reference.search import ReferenceIndex
from audit.similarity import common_size, cosine, pixels_at, rms_l2, split_product, tile_structure, tiled_l2

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
CALIBRATION_JSON = "calibration.json"
NULL_FILE = "null.parquet"
FORMAT_VERSION = 1
MIN_IMAGES = 100  # below this the tails a false rate of 1e-2..1e-3 needs cannot be estimated at all
QUERY_BLOCK = 256
# the settings a calibration is valid for: (key in calibration.json, detection setting)
SETTINGS = (("verify_size", "verify_size"), ("tile_grid", "tile_grid"), ("split_chunks", "split_chunks"),
            ("verify_top", "verify_top"))
NULL_SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("side", pa.int32()),
    ("neighbor_rows", pa.list_(pa.int64())), ("cosine", pa.list_(pa.float32())),
    ("split_product", pa.list_(pa.float32())), ("tiled_l2", pa.list_(pa.float32())),
    ("rms", pa.list_(pa.float32())), ("structure", pa.float32()), ("neighbor_structure", pa.list_(pa.float32())),
])


@dataclass(frozen=True)
class Null:
    """The calibration's null distributions, one entry per sampled training image (pairs with its
    ``verify_top`` nearest distinct training images; pixel columns NaN without images)."""

    record: dict[str, Any]  # calibration.json
    cosine: np.ndarray  # (n, verify_top)
    split_product: np.ndarray
    tiled_l2: np.ndarray
    rms: np.ndarray
    structure: np.ndarray  # (n,) the sampled image's structure
    neighbor_structure: np.ndarray  # (n, verify_top)

    @property
    def size(self) -> int:
        return int(self.cosine.shape[0])

    @property
    def has_pixels(self) -> bool:
        return bool(np.isfinite(self.tiled_l2).any())


def calibration_dir(root: Path) -> Path:
    return root / CALIBRATION_DIR


def remove_calibration(root: Path) -> None:
    """Forget a calibration (its index or duplicate settings changed: it is measured again)."""
    for name in (CALIBRATION_JSON, NULL_FILE):
        (calibration_dir(root) / name).unlink(missing_ok=True)


def calibrate(root: Path, detection: DetectionSection, reference: ReferenceSection, seed: int = 0) -> dict[str, Any]:
    """Measure the null on the reference at ``root`` (indexed; images where it has them) and write
    ``calibration/``; returns calibration.json's content. Refused with fewer than
    :data:`MIN_IMAGES` distinct indexed images."""
    started = time.time()
    index = ReferenceIndex(root)
    indexed = np.unique(np.concatenate([np.asarray(s.ids) for s in index.shards])) if index.shards else np.zeros(0, np.int64)
    images = ReferenceImages(root, index.manifest)
    rng = np.random.default_rng(seed)
    order = indexed[rng.permutation(indexed.size)]
    covered: set[int] = set()
    rows: list[dict[str, Any]] = []
    want = reference.calibration_sample
    with Progress("calibration", "image", min(want, int(order.size))) as progress:
        for start in range(0, order.size, QUERY_BLOCK):
            if len(rows) >= want:
                break
            block = np.array([r for r in order[start:start + QUERY_BLOCK].tolist() if r not in covered], np.int64)
            if block.size == 0:
                continue
            found = _distinct_neighbors(index, block, detection.verify_top, reference.dup_threshold)
            block_rows = [r for r in block.tolist() if r not in covered]
            stored = images.get(np.unique(np.concatenate([block] + [np.array(n, np.int64) for n, _ in found.values()])))
            for row in block_rows:
                if len(rows) >= want or row in covered:
                    continue
                neighbors, duplicates = found[row]
                covered.update(duplicates)
                covered.add(row)
                if len(neighbors) < detection.verify_top:
                    continue  # fewer distinct images than pairs to verify: the set is too small
                rows.append(_measure(index, stored, row, neighbors, detection))
                progress.update(1)
    distinct = len(rows)
    if distinct < MIN_IMAGES:
        raise InputError(f"{root}: only {distinct} distinct training images could be paired with {detection.verify_top} "
                         f"distinct neighbours; calibration needs at least {MIN_IMAGES}. Use a larger reference set, "
                         "or set detection.calibration: paper (the papers' absolute thresholds)")
    table = pa.Table.from_pylist(rows, schema=NULL_SCHEMA)
    folder = calibration_dir(root)
    write_parquet_atomic(folder / NULL_FILE, table)
    manifest = index.manifest
    record = {
        "format_version": FORMAT_VERSION,
        "model_id": manifest["embedding"]["model_id"],
        **{key: int(getattr(detection, setting)) for key, setting in SETTINGS},
        "dup_threshold": float(reference.dup_threshold),
        "sample": int(want),
        "seed": int(seed),
        "images": distinct,
        "with_pixels": int(np.isfinite(np.array([min(r["tiled_l2"]) for r in rows], np.float64)).sum()),
        "index": _index_identity(manifest),
        "sides": sorted({int(r["side"]) for r in rows if r["side"] > 0}),
        "created_at": time.time(),
        "seconds": round(time.time() - started, 2),
    }
    write_bytes_atomic(folder / CALIBRATION_JSON, json.dumps(record, indent=2).encode())  # last: the marker
    return record


def _index_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the index a calibration was measured on."""
    return {"count": int(manifest["count"]), "rows": int(manifest["rows"]), "factory": manifest["factory"]}


def _distinct_neighbors(index: ReferenceIndex, rows: np.ndarray, wanted: int, dup_threshold: float,
                        first_k: int = 16) -> dict[int, tuple[list[int], list[int]]]:
    """Row -> (its ``wanted`` nearest indexed rows that are not its near-duplicates, its
    near-duplicates seen), growing k for rows whose k nearest are all duplicates."""
    queries = index.vectors.get(rows)
    out: dict[int, tuple[list[int], list[int]]] = {}
    todo, k = np.arange(rows.size), first_k + wanted
    total = int(index.manifest["count"])
    while todo.size:
        scores, found = index.search(queries[todo], min(k, total))
        again = []
        for position, row_scores, row_found in zip(todo.tolist(), scores, found):
            row = int(rows[position])
            valid = row_found >= 0
            duplicates = [int(r) for r, s in zip(row_found[valid], row_scores[valid]) if s >= dup_threshold or r == row]
            distinct = [int(r) for r, s in zip(row_found[valid], row_scores[valid]) if s < dup_threshold and r != row]
            if len(distinct) >= wanted or k >= total:
                out[row] = (distinct[:wanted], duplicates)
            else:
                again.append(position)
        todo, k = np.array(again, np.int64), k * 4
    return out


def _measure(index: ReferenceIndex, stored: dict[int, tuple[str | None, str | None, bytes | None]], row: int,
             neighbors: list[int], detection: DetectionSection) -> dict[str, Any]:
    """One null entry: the sampled image against each of its distinct neighbours, measured as
    :func:`audit.detect.verify.compare` measures a sample against its reference neighbours."""
    vectors = index.vectors.get(np.array([row] + neighbors, np.int64))
    key, _, png = stored.get(row, (None, None, None))
    entry: dict[str, Any] = {
        "row": row, "key": key, "side": 0, "neighbor_rows": neighbors,
        "cosine": [float(v) for v in cosine(vectors[0], vectors[1:])],
        "split_product": [float(v) for v in split_product(vectors[0], vectors[1:], detection.split_chunks)],
        "tiled_l2": [float("nan")] * len(neighbors), "rms": [float("nan")] * len(neighbors),
        "structure": float("nan"), "neighbor_structure": [float("nan")] * len(neighbors),
    }
    other = [stored.get(n, (None, None, None))[2] for n in neighbors]
    if png is None or any(o is None for o in other):
        return entry  # precomputed embeddings without images: embedding nulls only
    own_size = Image.open(io.BytesIO(png)).size
    tiled, rms, structures = [], [], []
    side = 0
    for other_png in other:
        assert other_png is not None
        side = common_size(own_size, Image.open(io.BytesIO(other_png)).size, detection.verify_size, detection.tile_grid)
        x, y = pixels_at(png, side), pixels_at(other_png, side)
        tiled.append(float(tiled_l2(x, y, detection.tile_grid)))
        rms.append(float(rms_l2(x, y)))
        structures.append(float(tile_structure(y, detection.tile_grid)))
    entry.update(tiled_l2=tiled, rms=rms, neighbor_structure=structures, side=side,
                 structure=float(tile_structure(pixels_at(png, side), detection.tile_grid)))
    return entry


def load_calibration(root: Path, detection: DetectionSection, model_id: str | None) -> Null | None:
    """The calibration of the reference at ``root`` (None when it has none); refused, with the
    fix, when it was made for another embedder, verification size, tile grid, split chunks or
    number of verified neighbours, or on another index."""
    folder = calibration_dir(root)
    path = folder / CALIBRATION_JSON
    if not path.is_file() or not (folder / NULL_FILE).is_file():
        return None
    record = json.loads(path.read_text())
    fix = (f"run `memaudit reference calibrate {root} --force` with this config to measure it again, or set "
           "detection.calibration: paper")
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: calibration format {record.get('format_version')} is not {FORMAT_VERSION}; {fix}")
    if model_id is not None and record.get("model_id") not in (None, model_id):
        raise InputError(f"{path}: calibrated with the embedder {record.get('model_id')}, this audit embeds with "
                         f"{model_id}; {fix}")
    differing = [f"detection.{setting}: calibrated {record.get(key)}, configured {getattr(detection, setting)}"
                 for key, setting in SETTINGS if record.get(key) != int(getattr(detection, setting))]
    if differing:
        raise InputError(f"{path}: calibrated for other settings ({'; '.join(differing)}); {fix}")
    from audit.reference.index import INDEX_DIR, load_manifest

    if record.get("index") != _index_identity(load_manifest(root / INDEX_DIR)):
        raise InputError(f"{path}: measured on another index ({record.get('index')}); the index was rebuilt "
                         f"since; {fix}")
    return read_null(root)


def read_null(root: Path) -> Null | None:
    """The calibration as written, unchecked (the report draws it; detection uses
    :func:`load_calibration`)."""
    folder = calibration_dir(root)
    if not (folder / CALIBRATION_JSON).is_file() or not (folder / NULL_FILE).is_file():
        return None
    record = json.loads((folder / CALIBRATION_JSON).read_text())
    table = pq.read_table(folder / NULL_FILE)

    def matrix(name: str) -> np.ndarray:
        return np.array(table.column(name).to_pylist(), dtype=np.float64).reshape(table.num_rows, -1)

    return Null(record, matrix("cosine"), matrix("split_product"), matrix("tiled_l2"), matrix("rms"),
                table.column("structure").to_numpy(zero_copy_only=False).astype(np.float64),
                matrix("neighbor_structure"))


def describe(record: dict[str, Any]) -> str:
    """One line for the CLI."""
    return (f"{record['images']} training images against their {record['verify_top']} nearest distinct images "
            f"({record['model_id']}, verification at {record['sides']} px, tiles {record['tile_grid']}x"
            f"{record['tile_grid']}, {record['with_pixels']} with pixels) in {record['seconds']} s")
