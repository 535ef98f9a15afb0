"""One run folder: its paths, its JSON files and its shards' completion markers.

``<root>/model=<name>/checkpoint=<id>/run=<run_id>/`` (names in :mod:`audit.layout`) holds
``run.json`` and one folder per table. A shard counts as complete when its marker exists and the
file on disk has the size the marker recorded; anything else is redone. A derived shard's marker
records ``inputs`` (the sha256 of the shards it was computed from and the settings that shaped
it), so a changed input redoes it (docs/architecture.md, "Contracts").

A store opened with a ``lease`` (the check of the driver's lease on the run, :mod:`audit.lease`)
verifies it before every publication: a shard's commit, a whole-run file, a removed marker.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from audit import layout
from audit.files import read_marker, remove_stale_temporaries, write_bytes_atomic, write_parquet_atomic
from audit.lease import LeaseCheck
from audit.location import Location
from audit.run_mirror import RunMirror
from audit.shard_writer import ShardWriter

log = logging.getLogger(__name__)


def run_location(root: str | Path | Location, model_name: str, checkpoint_id: str, run_id: str) -> Location:
    """The hive-style run folder under ``root``."""
    return Location.of(root).join(*layout.run_folder_parts(model_name, checkpoint_id, run_id))


class RunStore:
    """Paths and atomic I/O inside one run folder (local, or the mirror of an object-store run)."""

    def __init__(self, where: str | Path | Location, lease: LeaseCheck | None = None) -> None:
        self.where = Location.of(where)
        self.path = self.where.local
        self.mirror = RunMirror(self.where) if self.where.is_remote else None
        self.location: str = str(self.where)
        self.lease = lease

    def guard(self, what: str) -> None:
        """Refuse to publish ``what`` unless the driver's lease on the run still holds
        (nothing to check for a reader's store)."""
        if self.lease is not None:
            self.lease.verify(what)

    @property
    def full_location(self) -> str:
        """The run as reports name it: its URI, or its absolute path."""
        return self.where.full_name

    def publish(self, path: Path) -> None:
        """Upload one finished local file of the run (nothing to do for a local run)."""
        if self.mirror is not None:
            self.mirror.publish(path)

    def table_dir(self, table: str) -> Path:
        return self.path / table

    def shard_path(self, table: str, shard: str) -> Path:
        return self.path / layout.shard_file(table, shard)

    def marker_path(self, table: str, shard: str) -> Path:
        return self.path / layout.marker_file(table, shard)

    def read_json(self, name: str = layout.RUN_JSON) -> dict[str, Any] | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, obj: dict[str, Any], name: str = layout.RUN_JSON) -> None:
        self.guard(name)
        write_bytes_atomic(self.path / name, json.dumps(obj, indent=2, sort_keys=False).encode())
        self.publish(self.path / name)

    def write_table(self, table_name: str, file_name: str, table: pa.Table) -> Path:
        """Write a whole (small) table file atomically."""
        final = self.table_dir(table_name) / file_name
        self.guard(f"{table_name}/{file_name}")
        write_parquet_atomic(final, table)
        self.publish(final)
        return final

    def read_marker(self, table: str, shard: str) -> dict[str, Any] | None:
        return read_marker(self.marker_path(table, shard))

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
        self.guard(f"{table}/{shard}")
        if self.mirror is not None:
            self.mirror.remove(self.marker_path(table, shard))
        self.marker_path(table, shard).unlink(missing_ok=True)

    def open_shard(
        self, table: str, shard: str, schema: pa.Schema, compression: dict[str, str] | str = "zstd"
    ) -> ShardWriter:
        return ShardWriter(self.shard_path(table, shard), self.marker_path(table, shard), schema, compression,
                           publish=self.mirror.publish_shard if self.mirror is not None else None,
                           guard=None if self.lease is None else lambda: self.guard(f"{table}/{shard}"),
                           lease=None if self.lease is None else self.lease.token)

    def sync(self) -> int:
        """Bring in what other nodes published (object-store runs); returns files fetched."""
        return self.mirror.sync() if self.mirror is not None else 0

    def readable(self, table: str, shard: str) -> Path:
        """The local path of a complete shard, fetched first when another node published it."""
        if self.mirror is not None:
            self.mirror.fetch_shard(layout.marker_file(table, shard))
        return self.shard_path(table, shard)

    def readable_file(self, rel: str) -> Path:
        """The local path of a whole-run file (e.g. the prompts table), fetched if missing."""
        if self.mirror is not None:
            self.mirror.fetch_file(rel)
        return self.path / rel

    def remove_stale_tmp(self, table: str, older_than_s: float = 86_400) -> int:
        """Delete temporary files that crashed writers left in ``table`` (a day old by default)."""
        return remove_stale_temporaries(self.table_dir(table), older_than_s)
