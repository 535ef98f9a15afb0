"""Files that readers see whole or not at all, completion markers, and the local cache root.

Every writer in memaudit publishes through here (docs/architecture.md, "Files and markers"): a
file is written under a temporary name unique to its writer (``.<name>.tmp-<process id>-<random>``),
fsync'ed and renamed into place; a folder the same way. A *marker* is the small JSON file that
says a piece of work is complete; it is written after what it describes, never before.
This module is a leaf: it imports nothing from memaudit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

TMP_TAG = ".tmp-"
MARKERS = "_markers"  # the folder beside a table (or reference) holding its completion markers
LEASE_FILE = ".memaudit-lease.json"  # the writer's lease on a run or reference folder (audit.lease)


def cache_root() -> Path:
    """``$MEMAUDIT_CACHE``, else ``~/.cache/memaudit``: built-in checkpoints and references, and
    the local mirrors of object-store folders."""
    return Path(os.environ.get("MEMAUDIT_CACHE", Path.home() / ".cache" / "memaudit"))


def folder_safe(text: str) -> str:
    """``text`` with every character other than letters, digits, '.', '_' and '-' replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def temporary_name(final: Path) -> Path:
    """A hidden sibling of ``final`` that no other writer (process or thread) can pick."""
    return final.with_name(f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(name: str) -> bool:
    """Whether a file name (or a path's last part) is a writer's temporary file."""
    return TMP_TAG in name.rsplit("/", 1)[-1]


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """OSErrors raised inside (pyarrow's carry no file name) name ``path`` and the plain reason."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(final: Path, sync: bool = True) -> Iterator[Path]:
    """A temporary path to write ``final`` to; renamed into place when the block succeeds, removed
    when it fails. With ``sync``, the file and its folder are fsync'ed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        with naming(final):
            yield tmp
            if sync:
                with tmp.open("rb+") as handle:
                    os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if sync:
        fsync_dir(final.parent)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it."""
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)


def write_parquet_atomic(final: Path, table: pa.Table) -> int:
    """Write a whole (small) Parquet file under a temporary name and rename it; returns its size."""
    with atomic_file(final, sync=False) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return final.stat().st_size


def save_npy_atomic(final: Path, array: np.ndarray) -> int:
    """``np.save`` under a temporary name, fsync, rename; returns the file size."""
    with atomic_file(final) as tmp:
        with tmp.open("wb") as handle:
            np.save(handle, array)
    return final.stat().st_size


def build_folder_once(final: Path, build: Callable[[Path], object]) -> Path:
    """``final``, built by ``build(tmp)`` into a temporary sibling and renamed, unless it exists:
    concurrent builders never see half a folder, and losing the race to another is not an error."""
    if final.exists():
        return final
    tmp = temporary_name(final)
    try:
        build(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise  # not a lost race with another builder
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return final


def cached_build(name: str, build: Callable[[Path], object]) -> Path:
    """``cache_root()/builtin/<name>``, built by ``build(path)`` on first use (see
    :func:`build_folder_once`): built-in checkpoints, references and descriptors."""
    return build_folder_once(cache_root() / "builtin" / name, build)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def marker_fields(started_at: float, **fields: Any) -> dict[str, Any]:
    """A completion marker: what the writer says of the work, plus when and where it was done."""
    return {**fields, "started_at": started_at, "finished_at": time.time(), "host": socket.gethostname(),
            "process_id": os.getpid()}


def encode_marker(marker: dict[str, Any]) -> bytes:
    return json.dumps(marker, indent=2).encode()


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker at ``path``; None when it is missing or unreadable (the work is then redone)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable completion marker; the work will be redone", path)
        return None


def remove_stale_temporaries(folder: Path, older_than_s: float = 86_400) -> int:
    """Delete temporary files that crashed writers left in ``folder`` (a day old by default, so
    another process's write in progress is never touched); returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.glob(f".*{TMP_TAG}*"):
        if time.time() - path.stat().st_mtime > older_than_s:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
