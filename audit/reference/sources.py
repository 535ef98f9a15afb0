"""Reading img2dataset output folders (webdataset and parquet output formats).

img2dataset writes one shard per input chunk: ``00000.tar`` (webdataset: ``<key>.jpg``,
``<key>.txt``, ``<key>.json`` members) or ``00000.parquet`` (parquet: the image bytes in a
column named after the encode format), and, for webdataset, a ``00000.parquet`` holding every
row's metadata including the ones that failed to download. Rows are read in chunks, so a shard of
any size streams; rows that failed to download come out with their img2dataset status and
message instead of image bytes.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from audit.errors import InputError
from audit.location import Location

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_SHARD = re.compile(r"^(\d+)\.(tar|parquet)$")
Rows = dict[str, list[Any]]
COLUMNS = ("key", "url", "caption", "image", "download_error")


@dataclass(frozen=True)
class SourceShard:
    name: str  # e.g. "00003"
    format: str  # "webdataset" or "parquet"
    path: Path  # the .tar or the .parquet holding images (on this machine, once fetched)
    meta: Path | None  # webdataset: the img2dataset metadata parquet beside the tar
    origin: str | None = None  # the object-store folder the files come from (None: a local folder)

    @property
    def source(self) -> str:
        """Where the shard's images are, as recorded in markers: a path, or a URI."""
        return f"{self.origin}/{self.path.name}" if self.origin else str(self.path)


def find_shards(folder: str | Path | Location, fmt: str = "auto") -> list[SourceShard]:
    """The shards of an img2dataset output folder (or object-store prefix), in shard order. The
    files of a prefix's shards are fetched by :func:`fetch` where a shard is read."""
    where = Location.of(folder)
    origin, local = where.uri, where.local
    if where.is_remote:
        names = [local / rel for rel in where.remote.listing() if "/" not in rel]
    else:
        if not local.is_dir():
            raise InputError(f"{folder}: not a folder; give an img2dataset output folder")
        names = list(local.iterdir())
    tars = {m.group(1): p for p in names if (m := _SHARD.match(p.name)) and m.group(2) == "tar"}
    parquets = {m.group(1): p for p in names if (m := _SHARD.match(p.name)) and m.group(2) == "parquet"}
    if fmt == "auto":
        fmt = "webdataset" if tars else "parquet"
    if fmt == "webdataset":
        shards = [SourceShard(n, fmt, p, parquets.get(n), origin) for n, p in tars.items()]
    else:
        shards = [SourceShard(n, fmt, p, None, origin) for n, p in parquets.items()]
    if not shards:
        raise InputError(f"{folder}: no img2dataset {fmt} shards (00000.{'tar' if fmt == 'webdataset' else 'parquet'}) "
                         "found; run img2dataset with --output_format webdataset or parquet into this folder")
    return sorted(shards, key=lambda s: int(s.name))


def fetch(shard: SourceShard) -> SourceShard:
    """Make a shard of an object-store source readable here (its files fetched once per machine);
    FileNotFoundError if its images are gone, a missing metadata file is dropped."""
    if shard.origin is None:
        return shard
    remote = Location.of(shard.origin).remote
    if not shard.path.is_file():
        remote.download(shard.path.name, shard.path)
    if shard.meta is not None and not shard.meta.is_file():
        try:
            remote.download(shard.meta.name, shard.meta)
        except FileNotFoundError:
            return replace(shard, meta=None)
    return shard


def source_shard(source: str, fmt: str) -> SourceShard | None:
    """The shard a marker's ``source`` names (a path or a URI), readable here; None if it is gone."""
    where = Location.of(source)
    if where.is_remote:
        origin = str(where).rsplit("/", 1)[0]
        path = where.local
        meta = path.with_suffix(".parquet") if fmt == "webdataset" else None
        try:
            return fetch(SourceShard(path.stem, fmt, path, meta, origin))
        except FileNotFoundError:  # the shard is gone
            return None
    path = where.local
    if not path.exists():
        return None
    meta = path.with_suffix(".parquet") if fmt == "webdataset" else None
    return SourceShard(path.stem, fmt, path, meta if meta and meta.exists() else None)


def _empty() -> Rows:
    return {name: [] for name in COLUMNS}


def _failure(meta: dict[str, Any]) -> str:
    return f"download: {meta.get('status') or 'failed'}: {meta.get('error_message') or 'no message'}"


def read_chunks(shard: SourceShard, chunk_rows: int = 256) -> Iterator[Rows]:
    """Rows of one shard (key, url, caption, image bytes or None, download_error), in chunks."""
    if shard.format == "parquet":
        yield from _parquet_chunks(shard.path, chunk_rows)
    else:
        yield from _webdataset_chunks(shard, chunk_rows)


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Rows]:
    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    names = file.schema_arrow.names
    image_col = next((c for c in IMAGE_EXTENSIONS if c in names), None)
    if image_col is None or "key" not in names:
        raise InputError(f"{path}: no image column ({', '.join(IMAGE_EXTENSIONS)}) or no key column; is this "
                         "an img2dataset parquet output shard?")
    for batch in file.iter_batches(batch_size=chunk_rows):
        data = batch.to_pydict()
        rows = _empty()
        for i in range(batch.num_rows):
            meta = {k: v[i] for k, v in data.items() if k != image_col}
            image = data[image_col][i]
            rows["key"].append(str(meta.get("key")))
            rows["url"].append(meta.get("url"))
            rows["caption"].append(meta.get("caption") if meta.get("caption") is not None else meta.get("txt"))
            ok = meta.get("status") in (None, "success")
            rows["image"].append(image if ok else None)
            rows["download_error"].append(None if ok else _failure(meta))
        yield rows


def _webdataset_chunks(shard: SourceShard, chunk_rows: int) -> Iterator[Rows]:
    failed: list[dict[str, Any]] = []
    if shard.meta is not None:
        table = pq.read_table(shard.meta).to_pylist()
        failed = [m for m in table if m.get("status") not in (None, "success")]
    rows = _empty()
    for sample in _tar_samples(shard.path):
        meta = sample.get("json") or {}
        rows["key"].append(sample["key"])
        rows["url"].append(meta.get("url"))
        rows["caption"].append(sample.get("txt") if sample.get("txt") is not None else meta.get("caption"))
        rows["image"].append(sample.get("image"))
        rows["download_error"].append(None if sample.get("image") is not None else "download: missing: no image member in the tar")
        if len(rows["key"]) >= chunk_rows:
            yield rows
            rows = _empty()
    for meta in failed:
        rows["key"].append(str(meta.get("key")))
        rows["url"].append(meta.get("url"))
        rows["caption"].append(meta.get("caption"))
        rows["image"].append(None)
        rows["download_error"].append(_failure(meta))
        if len(rows["key"]) >= chunk_rows:
            yield rows
            rows = _empty()
    if rows["key"]:
        yield rows


def _tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Group consecutive tar members by key (webdataset convention: ``<key>.<ext>``)."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if current is not None and key != current["key"]:
                    yield current
                    current = None
                current = current or {"key": key}
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    current["image"] = data
                elif ext == "txt":
                    current["txt"] = data.decode("utf-8", "replace")
                elif ext == "json":
                    try:
                        current["json"] = json.loads(data)
                    except ValueError:
                        current["json"] = {}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{path}: the tar file is unreadable or truncated ({exc}); re-download this shard") from None
    if current is not None:
        yield current
