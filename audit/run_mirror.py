"""A run folder on object storage, worked on through its local mirror.

Every file is written to the mirror first and then published, a shard before its marker;
:meth:`RunMirror.sync` and :meth:`RunMirror.fetch_shard` bring in what other nodes published. The
object store is the truth: a local marker the bucket lacks counts for nothing
(docs/architecture.md, "Locations").
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from audit.files import MARKERS, write_bytes_atomic
from audit.location import Location
from audit.remote import is_temporary, pulled_versions, record_pulled

log = logging.getLogger(__name__)

BATCH = 500  # markers read, and shards fetched, per concurrent batch of a sync
_SHARD_FILE = re.compile(r"^[^/]+/shard-\d+\.parquet$")  # <table>/shard-NNNNN.parquet: governed by its marker


def _is_marker(rel: str) -> bool:
    """A table's completion marker: ``<table>/_markers/<shard>.json``."""
    return f"/{MARKERS}/" in rel and rel.endswith(".json")


def _shard_of(marker_rel: str) -> str:
    table, _, name = marker_rel.rsplit("/", 2)
    return f"{table}/{name.removesuffix('.json')}.parquet"


class RunMirror:
    """The object-store folder of a run (``where``) and its local mirror."""

    def __init__(self, where: Location) -> None:
        self.where, self.remote, self.local = where, where.remote, where.local

    def publish(self, path: Path) -> None:
        """Upload one finished local file of the run."""
        self.where.publish_file(path)

    def publish_shard(self, final: Path, marker: Path, marker_bytes: bytes) -> None:
        """The shard file, then its marker."""
        self.where.publish_with_marker([final], marker, marker_bytes)

    def remove(self, path: Path) -> None:
        self.remote.remove(path.relative_to(self.local).as_posix())

    def sync(self) -> int:
        """Make the mirror match the object store: every shard its marker there calls complete is
        fetched (when the local copy differs), local markers the store lacks are dropped, other
        files missing locally are fetched. Returns files fetched.

        The bucket is listed page by page into (size, version) per object; markers not adopted at
        their current version are read ``BATCH`` at a time and their shards fetched batch by
        batch, so memory holds one batch's bytes, and a sync where nothing changed reads no marker
        from the store (docs/architecture.md, "Locations")."""
        listing = self.remote.inventory()
        known = pulled_versions(self.local)  # a marker whose version was adopted before is read here

        def unchanged(rel: str) -> bool:
            size, version = listing[rel]
            return bool(version) and known.get(rel) == [size, version] and (self.local / rel).is_file()

        adopted, stale = [], []  # markers adopted at their current version (read here), the others
        for rel in sorted(rel for rel in listing if _is_marker(rel)):
            (adopted if unchanged(rel) else stale).append(rel)
        fetched, lost = 0, set[str]()
        for start in range(0, len(adopted), BATCH):
            batch = adopted[start:start + BATCH]
            fetched += self._adopt_batch({rel: (self.local / rel).read_bytes() for rel in batch}, listing)
        for batch, read in self.remote.read_batches(stale, BATCH):
            lost.update(rel for rel in batch if rel not in read)  # deleted since the listing
            fetched += self._adopt_batch(read, listing)
        for local_marker in self.local.glob(f"*/{MARKERS}/*.json"):
            rel = local_marker.relative_to(self.local).as_posix()
            if rel not in listing or rel in lost:
                local_marker.unlink(missing_ok=True)
        for rel in listing:  # run.json, the prompts table, report/: fetched when new or changed
            if (_is_marker(rel) or _SHARD_FILE.match(rel) or is_temporary(rel) or "write-probe" in rel
                    or unchanged(rel)):
                continue
            self.remote.download(rel, self.local / rel)
            fetched += 1
        present = {rel: [size, version] for rel, (size, version) in listing.items()
                   if not _SHARD_FILE.match(rel) and (self.local / rel).is_file()}
        if present != known:
            record_pulled(self.local, present)
        if fetched:
            log.info("%s: fetched %d files into %s", self.remote.uri, fetched, self.local)
        return fetched

    def _adopt_batch(self, markers: dict[str, bytes], listing: dict[str, tuple[int, str]]) -> int:
        """Adopt a batch of markers (relative path -> bytes) whose shards ``listing`` sizes: the
        shards that differ locally are fetched in one concurrent batch, then their markers written.
        Returns shards fetched."""
        wanted = {rel: data for rel, data in markers.items() if self._needs_shard(rel, data, listing)}
        self.remote.download_many([(_shard_of(rel), self.local / _shard_of(rel)) for rel in wanted])
        for rel, data in wanted.items():  # the marker only after its shard, as when publishing
            write_bytes_atomic(self.local / rel, data)
        return len(wanted)

    def _needs_shard(self, marker_rel: str, data: bytes, listing: dict[str, tuple[int, str]] | None = None) -> bool:
        """Whether the shard a published marker (``data``) describes must be fetched: its local
        copy or marker differs and the store's shard (sized by ``listing`` when given) has the
        marker's size. A local marker that is not kept is removed first."""
        local_marker = self.local / marker_rel
        shard_rel = _shard_of(marker_rel)
        local_shard = self.local / shard_rel
        try:
            size = json.loads(data).get("bytes")
        except json.JSONDecodeError:
            log.warning("%s/%s: unreadable completion marker; the shard will be redone", self.remote.uri, marker_rel)
            local_marker.unlink(missing_ok=True)
            return False
        same = (local_marker.is_file() and local_marker.read_bytes() == data
                and local_shard.is_file() and local_shard.stat().st_size == size)
        if same:
            return False
        local_marker.unlink(missing_ok=True)
        remote_size = (listing[shard_rel][0] if shard_rel in listing else None) if listing is not None else size
        if remote_size != size:
            log.warning("%s/%s: missing or of another size than its marker says; the shard will be redone",
                        self.remote.uri, shard_rel)
            return False
        return True

    def fetch_shard(self, marker_rel: str) -> None:
        """Adopt one shard another node published (nothing when its marker is not in the bucket)."""
        data = self.remote.read(marker_rel)
        if data is not None and self._needs_shard(marker_rel, data):
            self.remote.download(_shard_of(marker_rel), self.local / _shard_of(marker_rel))
            write_bytes_atomic(self.local / marker_rel, data)

    def fetch_file(self, rel: str) -> None:
        """Fetch a whole-run file (e.g. the prompts table) when the mirror lacks it."""
        if not (self.local / rel).is_file():
            self.remote.download(rel, self.local / rel)
