"""Reference images by global row: back from an embedding row to the pixels it was made from.

A folder written by ``memaudit reference embed`` records, per file, the img2dataset shard it came
from (``_markers/{i}.json: source``) and, per row, its ``key``; the image is read from that shard
(one shard cached at a time per reader: neighbors of one prompt tend to share shards). Folders of
precomputed LAION embeddings have no images; rows there come back as None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from audit.files import MARKERS
from audit.reference.sources import SourceShard, read_chunks, source_shard
from audit.reference.vectors import VectorStore


class ReferenceImages:
    """``get(rows) -> {row: (key, caption, image bytes or None)}`` for global rows."""

    def __init__(self, root: Path, manifest: dict[str, Any], cache_shards: int = 2) -> None:
        self.root = root
        self.files = manifest["files"]
        self.locator = VectorStore([root / f["npy"] for f in self.files], [f["first_row"] for f in self.files])
        self._meta: dict[int, dict[str, list[Any]]] = {}
        self._shards: dict[str, dict[str, bytes]] = {}
        self._sources: dict[int, SourceShard | None] = {}
        self.cache_shards = cache_shards

    def _metadata(self, position: int) -> dict[str, list[Any]]:
        if position not in self._meta:
            path = self.root / self.files[position]["metadata"]
            names = pq.ParquetFile(path).schema_arrow.names
            columns = [c for c in ("key", "caption", "url", "source_shard") if c in names]
            self._meta[position] = pq.read_table(path, columns=columns).to_pydict()
        return self._meta[position]

    def _source(self, position: int) -> SourceShard | None:
        if position not in self._sources:
            self._sources[position] = self._find_source(position)
        return self._sources[position]

    def _find_source(self, position: int) -> SourceShard | None:
        marker = self.root / MARKERS / f"{self.files[position]['index']}.json"
        if not marker.is_file():
            return None
        info = json.loads(marker.read_text())
        return source_shard(info["source"], info["source_format"])

    def _images(self, source: SourceShard) -> dict[str, bytes]:
        cache_key = str(source.path)
        if cache_key not in self._shards:
            if len(self._shards) >= self.cache_shards:
                self._shards.pop(next(iter(self._shards)))
            images: dict[str, bytes] = {}
            for rows in read_chunks(source):
                for key, image in zip(rows["key"], rows["image"]):
                    if image is not None:
                        images[key] = image
            self._shards[cache_key] = images
        return self._shards[cache_key]

    def keys(self, rows: np.ndarray) -> list[str | None]:
        """The metadata ``key`` of each global row (None for -1)."""
        flat = np.asarray(rows).reshape(-1)
        positions, local = self.locator.locate(np.maximum(flat, 0))
        out: list[str | None] = []
        for row, position, i in zip(flat.tolist(), positions.tolist(), local.tolist()):
            meta = self._metadata(position)
            out.append(meta["key"][i] if row >= 0 and "key" in meta else None)
        return out

    def urls(self, rows: np.ndarray) -> dict[int, str | None]:
        """The metadata ``url`` of each global row (None where the folder records none)."""
        unique = np.unique(np.asarray(rows)[np.asarray(rows) >= 0])
        positions, local = self.locator.locate(unique)
        out: dict[int, str | None] = {}
        for row, position, i in zip(unique.tolist(), positions.tolist(), local.tolist()):
            meta = self._metadata(position)
            out[row] = meta["url"][i] if "url" in meta else None
        return out

    def get(self, rows: np.ndarray) -> dict[int, tuple[str | None, str | None, bytes | None]]:
        out: dict[int, tuple[str | None, str | None, bytes | None]] = {}
        unique = np.unique(np.asarray(rows)[np.asarray(rows) >= 0])
        positions, local = self.locator.locate(unique)
        for row, position, i in zip(unique.tolist(), positions.tolist(), local.tolist()):
            meta = self._metadata(position)
            key = meta["key"][i] if "key" in meta else None
            caption = meta["caption"][i] if "caption" in meta else None
            source = self._source(position)
            image = self._images(source).get(key) if source is not None and key is not None else None
            out[row] = (key, caption, image)
        return out
