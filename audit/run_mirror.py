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

_SHARD_FILE = re.compile(r"^[^/]+/shard-\d+\.parquet$")  # <table>/shard-NNNNN.parquet: governed by its marker


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
        files missing locally are fetched. Returns files fetched."""
        inventory = self.remote.inventory()
        objects = {rel: size for rel, (size, _) in inventory.items()}
        known = pulled_versions(self.local)  # a marker whose version was adopted before is read here

        def unchanged(rel: str) -> bool:
            return bool(inventory[rel][1]) and known.get(rel) == list(inventory[rel]) and (self.local / rel).is_file()

        is_marker = [rel for rel in inventory if f"/{MARKERS}/" in rel and rel.endswith(".json")]
        markers = {rel: (self.local / rel).read_bytes() for rel in is_marker if unchanged(rel)}
        markers |= self.remote.read_many(sorted(set(is_marker) - set(markers)))
        fetched = sum(self._adopt(rel, data, objects) for rel, data in markers.items())
        for local_marker in self.local.glob(f"*/{MARKERS}/*.json"):
            if local_marker.relative_to(self.local).as_posix() not in markers:
                local_marker.unlink(missing_ok=True)
        for rel in inventory:  # run.json, the prompts table, report/: fetched when new or changed
            if (rel in markers or _SHARD_FILE.match(rel) or is_temporary(rel) or "write-probe" in rel
                    or unchanged(rel)):
                continue
            self.remote.download(rel, self.local / rel)
            fetched += 1
        present = {rel: list(version) for rel, version in inventory.items()
                   if not _SHARD_FILE.match(rel) and (self.local / rel).is_file()}
        if present != known:
            record_pulled(self.local, present)
        if fetched:
            log.info("%s: fetched %d files into %s", self.remote.uri, fetched, self.local)
        return fetched

    def _adopt(self, marker_rel: str, data: bytes, objects: dict[str, int] | None = None) -> int:
        """Bring one published shard (marker ``data``) into the mirror; 1 if its file was fetched."""
        local_marker = self.local / marker_rel
        shard_rel = _shard_of(marker_rel)
        local_shard = self.local / shard_rel
        try:
            size = json.loads(data).get("bytes")
        except json.JSONDecodeError:
            log.warning("%s/%s: unreadable completion marker; the shard will be redone", self.remote.uri, marker_rel)
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
                        self.remote.uri, shard_rel)
            return 0
        self.remote.download(shard_rel, local_shard)
        write_bytes_atomic(local_marker, data)
        return 1

    def fetch_shard(self, marker_rel: str) -> None:
        """Adopt one shard another node published (nothing when its marker is not in the bucket)."""
        data = self.remote.read(marker_rel)
        if data is not None:
            self._adopt(marker_rel, data)

    def fetch_file(self, rel: str) -> None:
        """Fetch a whole-run file (e.g. the prompts table) when the mirror lacks it."""
        if not (self.local / rel).is_file():
            self.remote.download(rel, self.local / rel)
