"""The run folder: layout, atomic writes and completion markers (DESIGN §3).

``<root>/model=<name>/checkpoint=<id>/run=<run_id>/`` holds ``run.json`` and one folder per table.
A shard is written to a hidden temporary file, fsync'ed, renamed into place, and only then is its
completion marker (``<table>/_markers/<shard>.json``) written. A shard counts as complete when its
marker exists and the file on disk has the size the marker recorded; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.errors import StorageError
from audit.remote import RemoteFolder, is_temporary, is_uri, join, mirror_path, pulled_versions, record_pulled

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
MARKERS = "_markers"
TMP_TAG = ".tmp-"
ROW_GROUP_BYTES = 128 * 2**20
_SHARD_FILE = re.compile(r"^[^/]+/shard-\d+\.parquet$")  # <table>/shard-NNNNN.parquet: governed by its marker


def folder_safe(text: str) -> str:
    """``text`` with every character other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def run_dir(root: str | Path, model_name: str, checkpoint_id: str, run_id: str) -> str | Path:
    """Hive-style run folder, so DuckDB/Polars can glob many runs and get the keys as columns
    (a path, or a URI when ``root`` is one)."""
    return join(root, f"model={model_name}", f"checkpoint={checkpoint_id}", f"run={run_id}")


def check_writable(path: str | Path, what: str) -> None:
    """Refuse, before any work, a location that cannot be written (a read-only mount, no
    permission): checked on ``path`` or, if it does not exist yet, its nearest existing parent;
    on an object store, by writing and deleting a probe object."""
    if is_uri(path):
        RemoteFolder(str(path)).check_writable(what)
        return
    target = Path(path).absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    why = "it is on a read-only file system" if read_only else "permission denied"
    raise StorageError(f"{what} {target}: cannot write to {probe} ({why}); remount it writable, fix its "
                       "permissions or point it elsewhere: nothing was written and finished work is untouched")


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """OSErrors raised inside (pyarrow's carry no file name) name ``path`` and the plain reason."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(final.parent)


def write_parquet_atomic(final: Path, table: pa.Table) -> int:
    """Write a whole (small) Parquet file under a temporary name and rename it; returns its size."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    try:
        with _naming(final):
            pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final.stat().st_size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunStore:
    """Paths and atomic I/O inside one run folder.

    ``location`` is a path or an object-store URI. With a URI, ``path`` is the local mirror (see
    :mod:`audit.remote`): every file is written there first and then published, a shard before
    its marker; :meth:`sync` and :meth:`readable` bring in what other nodes published. The
    object store is the truth: a local marker the bucket lacks counts for nothing.
    """

    def __init__(self, location: str | Path) -> None:
        self.remote = RemoteFolder(str(location)) if is_uri(location) else None
        self.path = mirror_path(self.remote.uri) if self.remote else Path(location)
        self.location: str = self.remote.uri if self.remote else str(self.path)

    @property
    def full_location(self) -> str:
        """The run as reports name it: its URI, or its absolute path."""
        return self.location if self.remote is not None else str(self.path.resolve())

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def publish(self, path: Path) -> None:
        """Upload one finished local file of the run (no-op for a local run)."""
        if self.remote is not None:
            self.remote.upload(path, self._rel(path))

    def _publish_shard(self, final: Path, marker: Path, marker_bytes: bytes) -> None:
        if self.remote is not None:
            self.remote.upload(final, self._rel(final))
            self.remote.write(self._rel(marker), marker_bytes)

    def table_dir(self, table: str) -> Path:
        return self.path / table

    def shard_path(self, table: str, shard: str) -> Path:
        return self.table_dir(table) / f"{shard}.parquet"

    def marker_path(self, table: str, shard: str) -> Path:
        return self.table_dir(table) / MARKERS / f"{shard}.json"

    def read_json(self, name: str = RUN_JSON) -> dict[str, Any] | None:
        path = self.path / name
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def write_json(self, obj: dict[str, Any], name: str = RUN_JSON) -> None:
        write_bytes_atomic(self.path / name, json.dumps(obj, indent=2, sort_keys=False).encode())
        self.publish(self.path / name)

    def write_table(self, table_name: str, file_name: str, table: pa.Table) -> Path:
        """Write a whole (small) table file atomically."""
        final = self.table_dir(table_name) / file_name
        write_parquet_atomic(final, table)
        self.publish(final)
        return final

    def read_marker(self, table: str, shard: str) -> dict[str, Any] | None:
        path = self.marker_path(table, shard)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s: unreadable completion marker; the shard will be redone", path)
            return None

    def is_complete(self, table: str, shard: str) -> bool:
        marker = self.read_marker(table, shard)
        path = self.shard_path(table, shard)
        if marker is None or not path.exists():
            return False
        if path.stat().st_size != marker.get("bytes"):
            log.warning("%s: size differs from its completion marker; the shard will be redone", path)
            return False
        return True

    def status_totals(self, table: str, shards: list[str]) -> dict[str, int]:
        """Row counts by status over the complete shards among ``shards``."""
        totals: dict[str, int] = {"complete_shards": 0}
        for shard in shards:
            marker = self.read_marker(table, shard) if self.is_complete(table, shard) else None
            if marker is None:
                continue
            totals["complete_shards"] += 1
            for status, count in marker.get("status_counts", {}).items():
                totals[status] = totals.get(status, 0) + int(count)
        return totals

    def inputs_of(self, shard: str, tables: tuple[str, ...], extra: dict[str, str] | None = None) -> dict[str, str]:
        """What a derived shard is computed from: the sha256 of the same shard of ``tables`` (from
        their markers) plus ``extra`` settings. Derived markers record it as ``inputs``."""
        hashes = {t: (self.read_marker(t, shard) or {}).get("sha256", "") for t in tables}
        return hashes | (extra or {})

    def is_current(self, table: str, shard: str, inputs: dict[str, str]) -> bool:
        """Complete and computed from ``inputs`` (a regenerated input or a changed setting redoes it)."""
        return self.is_complete(table, shard) and (self.read_marker(table, shard) or {}).get("inputs") == inputs

    def invalidate(self, table: str, shard: str) -> None:
        """Mark a shard incomplete before it is rewritten (a crash then means 'redo it')."""
        if self.remote is not None:
            self.remote.remove(self._rel(self.marker_path(table, shard)))
        self.marker_path(table, shard).unlink(missing_ok=True)

    def open_shard(
        self, table: str, shard: str, schema: pa.Schema, compression: dict[str, str] | str = "zstd"
    ) -> ShardWriter:
        return ShardWriter(self.shard_path(table, shard), self.marker_path(table, shard), schema, compression,
                           publish=self._publish_shard if self.remote is not None else None)

    def sync(self) -> int:
        """Make the local mirror of a URI run match the object store: every shard its marker
        there calls complete is fetched (when the local copy differs), local markers the store
        lacks are dropped, other files missing locally are fetched. Returns files fetched."""
        if self.remote is None:
            return 0
        inventory = self.remote.inventory()
        objects = {rel: size for rel, (size, _) in inventory.items()}
        known = pulled_versions(self.path)  # a marker whose version was adopted before is read here

        def unchanged(rel: str) -> bool:
            return bool(inventory[rel][1]) and known.get(rel) == list(inventory[rel]) and (self.path / rel).is_file()

        is_marker = [rel for rel in inventory if f"/{MARKERS}/" in rel and rel.endswith(".json")]
        markers = {rel: (self.path / rel).read_bytes() for rel in is_marker if unchanged(rel)}
        markers |= self.remote.read_many(sorted(set(is_marker) - set(markers)))
        fetched = sum(self._adopt(rel, data, objects) for rel, data in markers.items())
        for local_marker in self.path.glob(f"*/{MARKERS}/*.json"):
            if self._rel(local_marker) not in markers:
                local_marker.unlink(missing_ok=True)
        for rel in inventory:  # run.json, the prompts table, report/: fetched when new or changed
            if (rel in markers or _SHARD_FILE.match(rel) or is_temporary(rel) or "write-probe" in rel
                    or unchanged(rel)):
                continue
            self.remote.download(rel, self.path / rel)
            fetched += 1
        present = {rel: list(version) for rel, version in inventory.items()
                   if not _SHARD_FILE.match(rel) and (self.path / rel).is_file()}
        if present != known:
            record_pulled(self.path, present)
        if fetched:
            log.info("%s: fetched %d files into %s", self.location, fetched, self.path)
        return fetched

    @staticmethod
    def _shard_rel(marker_rel: str) -> str:
        table, _, name = marker_rel.rsplit("/", 2)
        return f"{table}/{name.removesuffix('.json')}.parquet"

    def _adopt(self, marker_rel: str, data: bytes, objects: dict[str, int] | None = None) -> int:
        """Bring one published shard (marker ``data``) into the mirror; 1 if its file was fetched."""
        local_marker = self.path / marker_rel
        shard_rel = self._shard_rel(marker_rel)
        local_shard = self.path / shard_rel
        try:
            size = json.loads(data).get("bytes")
        except json.JSONDecodeError:
            log.warning("%s/%s: unreadable completion marker; the shard will be redone", self.location, marker_rel)
            local_marker.unlink(missing_ok=True)
            return 0
        same = (local_marker.is_file() and local_marker.read_bytes() == data
                and local_shard.is_file() and local_shard.stat().st_size == size)
        if same:
            return 0
        local_marker.unlink(missing_ok=True)
        remote_size = objects.get(shard_rel) if objects is not None else size
        if remote_size != size:
            log.warning("%s/%s: missing or of another size than its marker says; the shard will be redone",
                        self.location, shard_rel)
            return 0
        self.remote.download(shard_rel, local_shard)  # type: ignore[union-attr]
        write_bytes_atomic(local_marker, data)
        return 1

    def readable(self, table: str, shard: str) -> Path:
        """The local path of a complete shard, fetched first when another node published it."""
        if self.remote is not None:
            rel = self._rel(self.marker_path(table, shard))
            data = self.remote.read(rel)
            if data is not None:
                self._adopt(rel, data)
        return self.shard_path(table, shard)

    def readable_file(self, rel: str) -> Path:
        """The local path of a whole-run file (e.g. ``prompts/prompts.parquet``), fetched if missing."""
        local = self.path / rel
        if self.remote is not None and not local.is_file():
            self.remote.download(rel, local)
        return local

    def remove_stale_tmp(self, table: str, older_than_s: float = 86_400) -> int:
        """Delete temporary files that crashed writers left behind (a day old by default, so
        another process's write in progress is never touched)."""
        removed = 0
        folder = self.table_dir(table)
        if not folder.exists():
            return 0
        for path in folder.glob(f".*{TMP_TAG}*"):
            if time.time() - path.stat().st_mtime > older_than_s:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class ShardWriter:
    """Streams record batches into one shard's Parquet file; ``commit`` publishes it.

    Rows are buffered into row groups of about ``row_group_bytes``; the file appears under its
    final name only in ``commit``, after which the marker is written (``publish``, when given,
    uploads the file and then the marker to the object store before the local marker is
    written). Leaving the ``with`` block with an exception deletes the temporary file and leaves
    no marker.
    """

    def __init__(
        self,
        final: Path,
        marker: Path,
        schema: pa.Schema,
        compression: dict[str, str] | str,
        row_group_bytes: int = ROW_GROUP_BYTES,
        publish: Callable[[Path, Path, bytes], None] | None = None,
    ) -> None:
        self.final, self.marker, self.schema = final, marker, schema
        self.publish = publish
        self.row_group_bytes = row_group_bytes
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path(final)
        try:
            with _naming(final):
                self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
                    self.tmp, schema, compression=compression, use_dictionary=False, write_statistics=True
                )
        except BaseException:
            self.tmp.unlink(missing_ok=True)  # the file may exist (e.g. a full disk refused its header)
            raise
        self._buffer: list[pa.Table] = []
        self._buffered_bytes = 0
        self.rows = 0
        self.status_counts: dict[str, int] = {}
        self.first_error: str | None = None
        self.started_at = time.time()

    def write(self, rows: dict[str, np.ndarray | list[Any]] | pa.Table) -> None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pydict(
            {name: rows[name] for name in self.schema.names}, schema=self.schema
        )
        table = table.select(self.schema.names).cast(self.schema)
        self.rows += table.num_rows
        if "status" in self.schema.names:
            for status in table.column("status").to_pylist():
                self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if self.first_error is None and "error" in self.schema.names:
            self.first_error = next((e for e in table.column("error").to_pylist() if e), None)
        self._buffer.append(table)
        self._buffered_bytes += table.nbytes
        if self._buffered_bytes >= self.row_group_bytes:
            with _naming(self.final):
                self._flush()

    def _flush(self) -> None:
        if not self._buffer or self._writer is None:
            return
        table = pa.concat_tables(self._buffer)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._buffer, self._buffered_bytes = [], 0

    def commit(self, **extra: Any) -> dict[str, Any]:
        """Close, publish under the final name, then write the completion marker."""
        assert self._writer is not None, "commit() called twice"
        with _naming(self.final):
            self._flush()
            self._writer.close()
            self._writer = None
            with self.tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        size = self.tmp.stat().st_size
        digest = file_sha256(self.tmp)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        marker = {
            "shard": self.final.stem,
            "file": self.final.name,
            "rows": self.rows,
            "status_counts": self.status_counts,
            "first_error": self.first_error,
            "bytes": size,
            "sha256": digest,
            "started_at": self.started_at,
            "finished_at": time.time(),
            "host": socket.gethostname(),
            **extra,
        }
        data = json.dumps(marker, indent=2).encode()
        if self.publish is not None:  # the object store first: a local marker implies a published shard
            self.publish(self.final, self.marker, data)
        write_bytes_atomic(self.marker, data)
        return marker

    def abort(self) -> None:
        """Drop the temporary file (also when closing it fails, e.g. on a full disk)."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except OSError as exc:
            log.debug("%s: closing the abandoned writer failed: %s", self.tmp, exc)
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or self._writer is not None:
            self.abort()
