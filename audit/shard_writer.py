"""Streaming one shard's rows into its Parquet file, published whole, then its marker.

Rows are buffered into row groups of about ``row_group_bytes``; the file appears under its final
name only in :meth:`ShardWriter.commit`, after which the completion marker is written (``publish``,
when given, uploads the file and then the marker to the object store before the local marker is
written). ``guard``, when given, is called right before the file takes its final name: it raises
when the driver's lease on the run is gone (:mod:`audit.lease`), so nothing is published then; the
marker records the ``lease`` token the shard was committed under. Leaving the ``with`` block with
an exception deletes the temporary file and leaves no marker (docs/architecture.md, "Files and
markers").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.files import encode_marker, file_sha256, fsync_dir, marker_fields, naming, temporary_name, write_bytes_atomic

log = logging.getLogger(__name__)

ROW_GROUP_BYTES = 128 * 2**20
Publish = Callable[[Path, Path, bytes], None]  # (shard file, marker path, marker bytes)


class ShardWriter:
    """Streams record batches into one shard's Parquet file; ``commit`` publishes it."""

    def __init__(
        self,
        final: Path,
        marker: Path,
        schema: pa.Schema,
        compression: dict[str, str] | str,
        row_group_bytes: int = ROW_GROUP_BYTES,
        publish: Publish | None = None,
        guard: Callable[[], None] | None = None,
        lease: str | None = None,
    ) -> None:
        self.final, self.marker, self.schema = final, marker, schema
        self.publish, self.guard, self.lease = publish, guard, lease
        self.row_group_bytes = row_group_bytes
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_name(final)
        try:
            with naming(final):
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
            with naming(self.final):
                self._flush()

    def _flush(self) -> None:
        if not self._buffer or self._writer is None:
            return
        table = pa.concat_tables(self._buffer)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._buffer, self._buffered_bytes = [], 0

    def commit(self, **extra: Any) -> dict[str, Any]:
        """Close, publish under the final name, then write the completion marker; returns it."""
        assert self._writer is not None, "commit() called twice"
        with naming(self.final):
            self._flush()
            self._writer.close()
            self._writer = None
            with self.tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        size = self.tmp.stat().st_size
        digest = file_sha256(self.tmp)
        if self.guard is not None:
            self.guard()  # raises when the lease is lost; __exit__ then drops the temporary file
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        marker = marker_fields(self.started_at, shard=self.final.stem, file=self.final.name, rows=self.rows,
                               status_counts=self.status_counts, first_error=self.first_error, bytes=size,
                               sha256=digest, **({"lease": self.lease} if self.lease else {}), **extra)
        data = encode_marker(marker)
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
