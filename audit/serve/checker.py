"""Checking images against a reference, one step per piece (Ray-free; docs/serving.md).

The same code the audit runs, so a verdict here means what it means in a report:

- :class:`ImageEmbedder`: decoding (the audit's bomb guard and conversions) and the run's embedder
  (:class:`audit.embed.embedding.EmbedStage`);
- :class:`ShardSearcher`: some of the reference's index shards with the join's exact re-ranking
  (:class:`audit.reference.search.ReferenceIndex`); :func:`merge_topk` merges groups;
- :class:`Verifier`: the top ``detection.verify_top`` candidates compared on pixels and copy
  embeddings and labelled as detection labels pairs (:mod:`audit.detect.verify`), with the
  thresholds the audit would apply against this reference; reference pixels read through their
  keys and kept in a bounded cache.

:func:`check_offline` chains them in one process (the batch path the service is measured against).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit.config import DetectionSection, EmbeddingSection
from audit.detect import verify
from audit.detect.thresholds import Thresholds
from audit.embed.embedding import EmbedStage
from audit.embed.decode import decode_image
from audit.reference.images import ReferenceImages
from audit.reference.index import INDEX_DIR, load_manifest
from audit.reference.search import ReferenceIndex, merge_topk
from audit.reference.vectors import VectorStore
from audit.schema import STATUS_OK


@dataclass(frozen=True)
class Embedded:
    """One image embedded (``vector``, unit float32) or why not (``error``: the audit's decode
    codes, e.g. ``too_large: …`` for a decompression bomb)."""

    vector: np.ndarray | None
    error: str | None
    width: int
    height: int


class ImageEmbedder:
    """Image bytes in, embeddings out, as the audit embeds samples."""

    def __init__(self, section: EmbeddingSection, device: str = "cpu") -> None:
        self.stage = EmbedStage(section, device)
        self.max_pixels = section.max_image_pixels

    @property
    def model_id(self) -> str:
        return self.stage.model_id

    def embed(self, images: list[bytes]) -> list[Embedded]:
        decoded = [decode_image(data, self.max_pixels) for data in images]
        out = self.stage.embed_decoded(decoded)
        return [Embedded(np.asarray(out["embedding"][i], np.float32) if out["status"][i] == STATUS_OK else None,
                         out["error"][i], int(out["width"][i]), int(out["height"][i])) for i in range(len(images))]


class ShardSearcher:
    """Top-k over some index shards (``only``: their numbers; None: all) of a reference folder."""

    def __init__(self, reference: Path, only: list[int] | None = None) -> None:
        self.index = ReferenceIndex(reference, only=only)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (n, k), for unit-row ``queries``."""
        return self.index.search(queries, k)


def shard_groups(reference: Path, groups: int) -> list[list[int]]:
    """The reference's index shards dealt into at most ``groups`` non-empty groups, in order."""
    shards = [int(s["shard"]) for s in load_manifest(reference / INDEX_DIR)["shards"]]
    count = max(1, min(groups, len(shards)))
    return [shards[i::count] for i in range(count)]


class Verifier:
    """Candidates of one image verified on pixels and labelled."""

    def __init__(self, reference: Path, detection: DetectionSection, thresholds: Thresholds,
                 cache_images: int = 4096) -> None:
        manifest = load_manifest(reference / INDEX_DIR)
        files = manifest["files"]
        self.vectors = VectorStore([reference / f["npy"] for f in files], [f["first_row"] for f in files])
        self.images = ReferenceImages(reference, manifest)
        self.detection, self.thresholds = detection, thresholds
        self.cache: OrderedDict[int, tuple[str | None, str | None, str | None, bytes | None]] = OrderedDict()
        self.cache_images = cache_images
        self.lock = threading.Lock()  # the caches are shared by the threads a service verifies on

    def reference_items(self, rows: list[int]) -> dict[int, tuple[str | None, str | None, str | None, bytes | None]]:
        """(key, caption, url, image bytes) of reference rows, through a bounded LRU cache."""
        missing = [r for r in rows if r not in self.cache]
        if missing:
            found = self.images.get(np.array(missing))
            urls = self.images.urls(np.array(missing))
            for row in missing:
                key, caption, image = found.get(row, (None, None, None))
                self.cache[row] = (key, caption, urls.get(row), image)
        for row in rows:
            self.cache.move_to_end(row)
        while len(self.cache) > self.cache_images:
            self.cache.popitem(last=False)
        return {row: self.cache[row] for row in rows}

    def check(self, image: bytes, embedded: Embedded, caption: str | None, scores: np.ndarray,
              rows: np.ndarray) -> dict[str, Any]:
        """The verdict for one image: its strongest label among the verified candidates (``none``
        when none is a copy), and every candidate of the top-k with its measures."""
        found = [(float(s), int(r)) for s, r in zip(scores, rows) if r >= 0 and np.isfinite(s)]
        with self.lock:
            items = self.reference_items([r for _, r in found])
            ref_vectors = self.vectors.get(np.array([r for _, r in found], np.int64)) if found else np.zeros((0, 1))
        candidates, verdict = [], verify.NONE
        for i, (score, row) in enumerate(found):
            key, ref_caption, url, ref_png = items[row]
            candidate: dict[str, Any] = {
                "rank": i, "row": row, "key": key, "caption": ref_caption, "url": url, "cosine": score,
                "split_product": float(verify.split_product(embedded.vector, ref_vectors[i], self.detection.split_chunks)),
                "tiled_l2": None, "rms": None, "label": None,
                "own": verify.is_own(caption, None, ref_caption, key) if caption is not None else False,
            }
            if i < self.detection.verify_top and ref_png is not None:
                measures = verify.compare(image, ref_png, embedded.vector, ref_vectors[i], self.detection)
                label = verify.label(measures, candidate["own"], self.thresholds)
                candidate.update(tiled_l2=measures["tiled_l2"], rms=measures["rms"], label=label)
                if verify.LABEL_ORDER[label] > verify.LABEL_ORDER[verdict]:
                    verdict = label
            candidates.append(candidate)
        return {"verdict": verdict, "candidates": candidates}


def error_result(embedded: Embedded) -> dict[str, Any]:
    """The answer for an image that does not decode or embed."""
    return {"status": "error", "error": embedded.error, "verdict": None, "candidates": []}


def embedded_queries(embedded: list[Embedded]) -> np.ndarray | None:
    """The embedded images' vectors as float32 query rows (None: no image embedded)."""
    vectors = [e.vector for e in embedded if e.vector is not None]
    return np.stack(vectors).astype(np.float32) if vectors else None


def verified(verifier: Verifier, images: list[bytes], embedded: list[Embedded], captions: list[str | None],
             scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    """Each image's result: its verdict and candidates (``scores``/``rows``: the top-k of the
    embedded images, in order), or the reason it did not embed."""
    results, j = [], 0
    for image, one, caption in zip(images, embedded, captions):
        if one.vector is None:
            results.append(error_result(one))
            continue
        results.append({"status": "ok", "error": None, **verifier.check(image, one, caption, scores[j], rows[j])})
        j += 1
    return results


def with_timings(results: list[dict[str, Any]], clock: list[float]) -> list[dict[str, Any]]:
    """Each checked result given the batch's step timings (``clock``: start, embedded, searched,
    verified), in milliseconds."""
    embed, search, verify_ = (1e3 * (b - a) for a, b in zip(clock, clock[1:]))
    timings = {"embed_ms": embed, "search_ms": search, "verify_ms": verify_, "total_ms": 1e3 * (clock[-1] - clock[0])}
    for result in results:
        if result["status"] == "ok":
            result["timings_ms"] = timings
    return results


def check_offline(images: list[bytes], captions: list[str | None], embedder: ImageEmbedder,
                  searchers: list[ShardSearcher], verifier: Verifier, k: int) -> list[dict[str, Any]]:
    """Embed, search every shard group, merge, verify: the whole check of a batch in this process,
    with the timings of each step (milliseconds, for the batch)."""
    clock = [time.perf_counter()]
    embedded = embedder.embed(images)
    clock.append(time.perf_counter())
    queries = embedded_queries(embedded)
    if queries is None:
        return [error_result(e) for e in embedded]
    scores, rows = merge_topk([s.search(queries, k) for s in searchers], k)
    clock.append(time.perf_counter())
    results = verified(verifier, images, embedded, captions, scores, rows)
    clock.append(time.perf_counter())
    return with_timings(results, clock)
