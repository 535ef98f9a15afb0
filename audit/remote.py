"""Object storage (``s3://``, ``gs://``, any fsspec URI): one folder of a bucket, and copying
folder trees between it and a local mirror.

Every stage reads and writes files on local disk; a URI is worked on through a **local mirror**
(see :mod:`audit.location`, which is the only module that tells a URI from a path) and the object
store is the truth. Writers publish a finished file with one PUT (an object appears whole or not
at all), so a shard goes up first and its completion marker after it; readers pull what the
object store holds. Cluster nodes therefore share nothing but the bucket, and a job retried on a
fresh pod resumes from the bucket. Credentials and endpoints come from the storage library's own
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, …).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from audit.errors import InputError, StorageError
from audit.files import LEASE_FILE, MARKERS, atomic_file, temporary_name, write_bytes_atomic
from audit.files import is_temporary as is_temporary_name

log = logging.getLogger(__name__)

_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
LAST_NAMES = ("manifest.json", "trained.json")  # published after everything else under a tree
PULLED = ".memaudit-pulled.json"  # in a mirror: the object versions it was last pulled at
LIST_PAGE = 1000  # keys per listing request (S3's maximum page)

Entry = tuple[str, int, str]  # an object of a listing: (path relative to the folder, size, version)


@contextmanager
def _talking_to(uri: str, action: str) -> Iterator[None]:
    """Errors of the storage library become one clear StorageError naming the URI."""
    try:
        yield
    except (StorageError, InputError, FileNotFoundError, FileExistsError):
        raise
    except ImportError as exc:
        package = _PACKAGES.get(uri.split("://", 1)[0].lower(), "the fsspec implementation for this scheme")
        raise InputError(f"{uri}: this URI needs {package} (pip install {package}): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp/google errors share no base class
        raise StorageError(
            f"{uri}: {action} failed ({type(exc).__name__}: {exc}); check the URI, the credentials and the endpoint "
            "(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL), then run again: finished work "
            "in the bucket is kept") from exc


class RemoteFolder:
    """One folder (key prefix) of an object store, addressed by paths relative to it."""

    def __init__(self, uri: str) -> None:
        import fsspec

        self.uri = uri.rstrip("/")
        with _talking_to(self.uri, "opening the file system"):
            # no instance cache: endpoint and credentials are read from the environment now
            self.fs, root = fsspec.core.url_to_fs(self.uri, skip_instance_cache=True)
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"RemoteFolder({self.uri!r})"

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def pages(self, rel: str = "", page: int | None = None) -> Iterator[list[Entry]]:
        """Every object under the folder (or under ``rel`` in it), one listing page at a time, each
        object as (relative path, size, version): the version is the ETag (or modification time)
        the store reports. On S3 each page is one ListObjectsV2 request of ``page`` keys and only
        these three fields are kept, so listing 10^5 objects never holds the library's detail
        dicts (docs/architecture.md, "Locations"); other stores are listed whole, then reduced."""
        with _talking_to(self.uri, "listing"):
            self.fs.invalidate_cache()
        if hasattr(self.fs, "call_s3") and not getattr(self.fs, "version_aware", False):
            yield from self._s3_pages(rel, page or LIST_PAGE)
            return
        with _talking_to(self.uri, "listing"):
            try:
                found = self.fs.find(self._key(rel), detail=True)
            except FileNotFoundError:
                return
        prefix = self.root + "/"
        yield [(name[len(prefix):], int(info.get("size") or 0),
                str(info.get("ETag") or info.get("etag") or info.get("mtime") or ""))
               for name, info in found.items() if name.startswith(prefix) and info.get("type", "file") == "file"]

    def _s3_pages(self, rel: str, page: int) -> Iterator[list[Entry]]:
        """ListObjectsV2 page by page under ``<root>/<rel>/`` (placeholder keys ending in "/" left out)."""
        bucket, key, _ = self.fs.split_path(self._key(rel))
        root_key = self.fs.split_path(self.root)[1]
        start = len(root_key) + 1 if root_key else 0  # where a path relative to the folder begins
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{key}/" if key else "", "MaxKeys": page}
        while True:
            with _talking_to(self.uri, "listing"):
                try:
                    out = self.fs.call_s3("list_objects_v2", **request)
                except FileNotFoundError:
                    return
            yield [(item["Key"][start:], int(item.get("Size") or 0), str(item.get("ETag") or ""))
                   for item in out.get("Contents", []) if not item["Key"].endswith("/")]
            if not out.get("IsTruncated") or not out.get("NextContinuationToken"):
                return
            request["ContinuationToken"] = out["NextContinuationToken"]

    def inventory(self, rel: str = "") -> dict[str, tuple[int, str]]:
        """Every object under the folder (or under ``rel`` in it): relative path -> (size,
        version), gathered from :meth:`pages`."""
        return {name: (size, version) for entries in self.pages(rel) for name, size, version in entries}

    def listing(self, rel: str = "") -> dict[str, int]:
        """Every object under the folder (or under ``rel`` in it): relative path -> size."""
        return {name: size for name, (size, _) in self.inventory(rel).items()}

    @cached_property
    def _whole_read(self) -> dict[str, Any]:
        """Keyword arguments that read a small object with one GET: s3fs (2025 on) otherwise asks
        for its size first, a HEAD per object, unless a listing it cached knows it."""
        takes = inspect.signature(self.fs._cat_file).parameters if hasattr(self.fs, "_cat_file") else {}
        return {"max_concurrency": 1} if "max_concurrency" in takes else {}

    def read(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        with _talking_to(self.uri, f"reading {rel}"):
            try:
                return self.fs.cat_file(self._key(rel), **self._whole_read)
            except FileNotFoundError:
                return None

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Several small objects in one concurrent request batch (missing ones left out)."""
        if not rels:
            return {}
        with _talking_to(self.uri, f"reading {len(rels)} objects"):
            got = self.fs.cat([self._key(r) for r in rels], on_error="omit", **self._whole_read)
        prefix = self.root + "/"
        return {name[len(prefix):]: data for name, data in got.items() if isinstance(data, bytes)}

    def read_batches(self, rels: list[str], batch: int) -> Iterator[tuple[list[str], dict[str, bytes]]]:
        """``rels`` read ``batch`` at a time (each batch one concurrent :meth:`read_many`): yields
        each batch's paths and what was read of them, so only one batch's bytes are held at once."""
        for start in range(0, len(rels), batch):
            chunk = rels[start:start + batch]
            yield chunk, self.read_many(chunk)

    def write(self, rel: str, data: bytes) -> None:
        with _talking_to(self.uri, f"writing {rel}"):
            self.fs.pipe_file(self._key(rel), data)

    def create(self, rel: str, data: bytes) -> bool:
        """Write the object only if it does not exist yet (a conditional PUT); False if it did."""
        with _talking_to(self.uri, f"creating {rel}"):
            try:
                with self.fs.open(self._key(rel), "xb") as handle:
                    handle.write(data)
            except FileExistsError:
                return False
        return True

    def upload(self, local: Path, rel: str) -> None:
        with _talking_to(self.uri, f"uploading {rel}"):
            self.fs.put_file(str(local), self._key(rel))

    def download(self, rel: str, local: Path) -> None:
        """Fetch one object to ``local`` atomically (a temporary name, then a rename)."""
        with atomic_file(local, sync=False) as tmp, _talking_to(self.uri, f"downloading {rel}"):
            self.fs.get_file(self._key(rel), str(tmp))

    def download_many(self, pairs: list[tuple[str, Path]]) -> None:
        """Fetch several objects (relative path, local file) in one concurrent batch, each to a
        temporary name first and renamed into place once all arrived; none is left half-written."""
        if not pairs:
            return
        tmps = [temporary_name(local) for _, local in pairs]
        for _, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _talking_to(self.uri, f"downloading {len(pairs)} objects"):
                self.fs.get([self._key(rel) for rel, _ in pairs], [str(tmp) for tmp in tmps])
            for tmp, (_, local) in zip(tmps, pairs):
                os.replace(tmp, local)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)

    def is_single_object(self) -> bool:
        """Whether the URI names one object rather than a prefix."""
        with _talking_to(self.uri, "looking up"):
            return bool(self.fs.isfile(self.root))

    def remove(self, rel: str) -> None:
        with _talking_to(self.uri, f"deleting {rel}"):
            try:
                self.fs.rm_file(self._key(rel))
            except FileNotFoundError:
                pass

    def check_writable(self, what: str) -> None:
        """Refuse, before any work, a bucket that does not exist or cannot be written."""
        probe = f".memaudit-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self.write(probe, b"")
        except FileNotFoundError as exc:
            raise StorageError(f"{what} {self.uri}: the bucket does not exist ({exc}); create it or point "
                               f"{what} elsewhere: nothing was written") from exc
        except StorageError as exc:
            raise StorageError(f"{what} {exc}") from exc
        self.remove(probe)


def _publish_order(rel: str) -> tuple[int, str]:
    """Data first, then completion markers, then manifests: a reader never sees a marker or a
    manifest before what it describes."""
    name = rel.rsplit("/", 1)[-1]
    if name in LAST_NAMES:
        return 2, rel
    return (1 if f"/{MARKERS}/" in f"/{rel}" else 0), rel


def is_temporary(rel: str) -> bool:
    """A writer's temporary file, the mirror's own bookkeeping or a folder's lease (it lives in the
    store only): never published nor fetched."""
    return is_temporary_name(rel) or rel == PULLED or rel.rsplit("/", 1)[-1] == LEASE_FILE


def pulled_versions(local: Path) -> dict[str, list[Any]]:
    """relative path -> [size, version] of the objects last fetched into (or published from) ``local``."""
    try:
        return json.loads((local / PULLED).read_text())
    except (OSError, ValueError):
        return {}


def record_pulled(local: Path, pulled: dict[str, list[Any]]) -> None:
    write_bytes_atomic(local / PULLED, json.dumps(pulled, sort_keys=True).encode())


def pull_tree(remote: RemoteFolder, local: Path) -> int:
    """Download every object whose (size, ETag) differs from what was last pulled here (or whose
    local file is missing or of another size); returns how many were fetched. The versions
    pulled are kept in ``local/.memaudit-pulled.json``, so an object rewritten with the same
    size (a re-built manifest) is fetched again."""
    pulled = pulled_versions(local)
    inventory = remote.inventory()
    fetched = 0
    for rel, (size, version) in sorted(inventory.items(), key=lambda item: _publish_order(item[0])):
        target = local / rel
        if is_temporary(rel):
            continue
        if target.is_file() and target.stat().st_size == size and pulled.get(rel) == [size, version]:
            continue
        remote.download(rel, target)
        pulled[rel] = [size, version]
        fetched += 1
    if fetched:
        record_pulled(local, pulled)
    return fetched


def local_state(local: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``local`` (paths relative to it): what :func:`push_tree`
    compares against."""
    return {p.relative_to(local).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in local.rglob("*") if p.is_file()} if local.is_dir() else {}


def push_tree(local: Path, remote: RemoteFolder, under: str = "",
              since: dict[str, tuple[int, int]] | None = None) -> int:
    """Upload the files of ``local / under`` (data, then markers, then manifests); with ``since``
    (a :func:`local_state`), only those new or changed since then. Returns how many."""
    prefix = f"{under}/" if under else ""
    now = {prefix + rel: state for rel, state in local_state(local / under if under else local).items()
           if not is_temporary(prefix + rel)}
    todo = [rel for rel, state in now.items() if since is None or since.get(rel) != state]
    for rel in sorted(todo, key=_publish_order):
        remote.upload(local / rel, rel)
    if todo:  # what was just published needs no fetching back
        pulled, inventory = pulled_versions(local), remote.inventory(under)
        record_pulled(local, pulled | {rel: list(inventory[rel]) for rel in todo if rel in inventory})
    return len(todo)
