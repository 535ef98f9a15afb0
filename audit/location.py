"""Where a folder or file is: a local path, or an object-store URI worked on through a local mirror.

Every path-or-URI memaudit reads from the config or the command line becomes a :class:`Location`
when it is read, and the layers below take that type (docs/architecture.md, "Locations"). This is
the only module that tells a URI from a path; it never decides what a location holds.

A URI's **mirror** is ``<cache>/mirror/<scheme>/<bucket>/<key>``, the same path on every node, so
a stage reads and writes local files and publishes them (:mod:`audit.remote`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from audit.errors import InputError, StorageError
from audit.files import cache_root
from audit.remote import RemoteFolder, local_state, pull_tree, push_tree

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _is_uri(text: str) -> bool:
    """True for ``scheme://…`` other than ``file://`` (a plain path is not a URI)."""
    match = _SCHEME.match(text)
    return bool(match) and match.group(1).lower() != "file"


def _mirror(uri: str) -> Path:
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InputError(f"{uri}: '.' and '..' are not allowed in an object-store URI")
    return cache_root() / "mirror" / scheme.lower() / Path(*parts)


@dataclass(frozen=True)
class Location:
    """A local folder or file (``uri`` None), or an object-store prefix or object with its mirror."""

    local: Path  # the path itself, or the URI's mirror on this machine
    uri: str | None = None

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        """The location a config value or command-line argument names (``file://`` is a path)."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if _is_uri(text):
            uri = text.rstrip("/")
            return cls(_mirror(uri), uri)
        return cls(Path(re.sub(r"^file://", "", text)))

    def __reduce__(self) -> tuple[object, tuple[str]]:
        """Sent to another process (a Ray worker, maybe on another node) as the name the user gave,
        so the mirror is the one of the machine that unpickles it (its own cache root)."""
        return Location.of, (str(self),)

    @property
    def is_remote(self) -> bool:
        return self.uri is not None

    @cached_property
    def remote(self) -> RemoteFolder:
        """The object-store folder (only for a remote location); opened once per Location."""
        if self.uri is None:
            raise ValueError(f"{self.local} is a local path, not an object-store location")
        return RemoteFolder(self.uri)

    def __str__(self) -> str:
        """As the user names it: the URI, or the path."""
        return self.uri if self.uri is not None else str(self.local)

    @property
    def full_name(self) -> str:
        """As reports name it: the URI, or the absolute path."""
        return self.uri if self.uri is not None else str(self.local.resolve())

    @property
    def name(self) -> str:
        """The last part of the path or URI."""
        return self.uri.rsplit("/", 1)[-1] if self.uri is not None else self.local.name

    def absolute(self) -> Location:
        """A local path made absolute (a URI is already)."""
        return self if self.uri is not None else Location(self.local.resolve())

    def join(self, *parts: str) -> Location:
        if self.uri is None:
            return Location(self.local.joinpath(*parts))
        uri = "/".join([self.uri, *parts])
        return Location(_mirror(uri), uri)

    def check_writable(self, what: str) -> None:
        """Refuse, before any work, a location that cannot be written (a read-only mount, no
        permission, a missing bucket): checked on the path or its nearest existing parent; on an
        object store, by writing and deleting a probe object."""
        if self.uri is not None:
            self.remote.check_writable(what)
            return
        target = self.local.absolute()
        probe = target
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise InputError(f"{what} {target}: {probe} is a file, not a folder; point {what} at a folder (or a new "
                             "path): nothing was written")
        if os.access(probe, os.W_OK | os.X_OK):
            return
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        why = "it is on a read-only file system" if read_only else "permission denied"
        raise StorageError(f"{what} {target}: cannot write to {probe} ({why}); remount it writable, fix its "
                           "permissions or point it elsewhere: nothing was written and finished work is untouched")

    def materialize(self, what: str) -> Path:
        """A local copy: the path itself, or the pulled mirror of a URI (a folder, or a single
        object: fetched again each time, it is small and may have changed)."""
        if self.uri is None:
            return self.local
        remote = self.remote
        if remote.is_single_object():
            parent, name = self.uri.rsplit("/", 1)
            RemoteFolder(parent).download(name, self.local)
            return self.local
        fetched = pull_tree(remote, self.local)
        if not self.local.is_dir():
            raise InputError(f"{what}: {self.uri} holds no files; check the URI (and the endpoint the credentials "
                             "point at)")
        log.info("%s: %s mirrored at %s (%d files fetched)", what, self.uri, self.local, fetched)
        return self.local

    def publish_file(self, path: Path) -> None:
        """Upload one finished file under the local folder (nothing to do for a local location)."""
        if self.uri is not None:
            self.remote.upload(path, path.relative_to(self.local).as_posix())

    def publish_with_marker(self, files: list[Path], marker: Path, marker_bytes: bytes) -> None:
        """Upload finished files, then their completion marker (docs/architecture.md, "Files and
        markers"): a marker in the bucket always means complete files. The caller writes the local
        marker afterwards, so a local marker implies a published shard."""
        if self.uri is None:
            return
        remote = self.remote
        for path in files:
            remote.upload(path, path.relative_to(self.local).as_posix())
        remote.write(marker.relative_to(self.local).as_posix(), marker_bytes)

    @contextmanager
    def working_copy(self, publish: bool, check: Callable[[str], None] | None = None) -> Iterator[Path]:
        """A local folder to work in: the path, or the mirror of a URI (pulled first); with
        ``publish``, what was written is pushed back afterwards, also after a failure, so finished
        work is kept for the next try; ``check`` (the writer's lease check) is called first and
        raises when this writer may no longer publish."""
        if self.uri is None:
            yield self.local
            return
        remote = self.remote
        pull_tree(remote, self.local)
        self.local.mkdir(parents=True, exist_ok=True)
        before = local_state(self.local)
        try:
            yield self.local
        finally:
            if publish:
                if check is not None:
                    check("the files written in the local mirror")
                pushed = push_tree(self.local, remote, since=before)
                log.info("%s: published %d files from %s", self.uri, pushed, self.local)
