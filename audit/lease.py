"""One writer per folder: the lease a driver holds on a run folder or a reference folder while it
writes there (docs/architecture.md, "Leases").

A lease is a small JSON record (``.memaudit-lease.json`` in the folder, or another name for the
locks of ``memaudit watch``): a random **token**, the holder's host and process id, when it was
taken and when it was last renewed.

- **On a file system** the record's file is held with an exclusive ``flock``: the kernel releases
  it when the holder's process dies, so a dead holder's lease is free at once and the next driver
  takes it over (and logs that it did). The file is never deleted (deleting a lock file lets two
  processes lock two different files of one name); releasing marks the record released.
- **On an object store** the record is an object created with a conditional PUT (``If-None-Match:
  *``), so exactly one driver creates it. Its holder renews it every ``ttl_s / 10`` seconds; a
  record not renewed for ``ttl_s`` belongs to a dead (or paused) holder and is taken over. A holder
  that finds it could not renew for ``ttl_s / 2`` (it was paused, or the store was unreachable)
  gives the lease up without writing: it may have been taken over already. Expiry compares the
  clocks of two machines, so their clocks must agree to well within ``ttl_s / 2`` (NTP does).

Writers never trust the driver's memory alone: the :class:`LeaseCheck` (folder, record name, token,
TTL) travels with every task, and a shard's commit calls :meth:`LeaseCheck.verify` right before it
publishes, so a worker of a driver that lost its lease publishes nothing (:class:`LeaseLost`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from audit.errors import MemauditError
from audit.files import LEASE_FILE
from audit.location import Location

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 300.0
_PROBE_S = 1.0  # a local lock busy for less than this is retried (a reader's probe holds it briefly)


class LeaseHeld(MemauditError):
    """Another live driver holds the lease (exit code 6)."""


class LeaseLost(MemauditError):
    """This driver's lease was taken over or expired: it may not publish anything more (exit code 6)."""


def describe(record: dict[str, Any] | None) -> str:
    """The holder, as the refusal names it."""
    if not record:
        return "an unknown holder"

    def when(key: str) -> str:
        value = record.get(key)
        if not isinstance(value, (int, float)):
            return "?"
        stamp = datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
        return f"{stamp} ({max(0.0, time.time() - value):.0f} s ago)"

    what = f" ({record['command']})" if record.get("command") else ""
    return (f"host {record.get('host', '?')}, process {record.get('process_id', '?')}{what}, started "
            f"{when('started_at')}, last renewed {when('renewed_at')}")


def _decode(data: bytes | None) -> dict[str, Any] | None:
    try:
        record = json.loads(data) if data else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_local(path: Path) -> dict[str, Any] | None:
    """The record in a local lease file; retried over a concurrent in-place rewrite."""
    for _ in range(20):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        record = _decode(data)
        if record is not None or not data:
            return record
        time.sleep(0.01)
    return None


def _expired(record: dict[str, Any], ttl_s: float) -> bool:
    renewed = record.get("renewed_at")
    return not isinstance(renewed, (int, float)) or time.time() - renewed > float(record.get("ttl_s") or ttl_s)


@dataclass(frozen=True)
class LeaseCheck:
    """What a worker needs to check, before it publishes, that its driver still holds the lease."""

    where: Location
    name: str
    token: str
    ttl_s: float

    def verify(self, what: str) -> None:
        """Raise :class:`LeaseLost` unless the lease is held under this token (and, on an object
        store, renewed within its TTL)."""
        if self.where.is_remote:
            record = _decode(self.where.remote.read(self.name))
        else:
            record = _read_local(self.where.local / self.name)
        if record is None or record.get("token") != self.token or record.get("released_at"):
            raise LeaseLost(f"{self.where}: not publishing {what}: this driver's lease on the folder was taken over "
                            f"by {describe(record) if record and not record.get('released_at') else 'nobody'}; "
                            "the driver holding it now finishes the work")
        if self.where.is_remote and _expired(record, self.ttl_s):
            raise LeaseLost(f"{self.where}: not publishing {what}: this driver's lease was not renewed for over "
                            f"{self.ttl_s:.0f} s (paused, or the store unreachable) and may be taken over; run "
                            "again to resume")


class Lease:
    """The lease on one folder, held by this process (``with Lease(...).acquire(wait):``)."""

    def __init__(self, where: str | Path | Location, what: str, name: str = LEASE_FILE,
                 ttl_s: float = DEFAULT_TTL_S, command: str = "") -> None:
        self.where, self.what, self.name = Location.of(where), what, name
        self.ttl_s, self.command = float(ttl_s), command
        self.token = uuid.uuid4().hex
        self.started_at = 0.0
        self.renewed_at = 0.0
        self.lost: str | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def check(self) -> LeaseCheck:
        return LeaseCheck(self.where, self.name, self.token, self.ttl_s)

    def _record(self, **extra: Any) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "process_id": os.getpid(),
                           "command": self.command, "started_at": self.started_at, "renewed_at": self.renewed_at,
                           "ttl_s": self.ttl_s, **extra}).encode()

    # taking and giving back

    def acquire(self, wait: bool = False) -> Lease:
        """Take the lease; a live holder's is waited for (``wait``) or refused with
        :class:`LeaseHeld` naming it; a dead holder's is taken over, and that is logged."""
        self.started_at = self.renewed_at = time.time()
        taken = self._acquire_remote(wait) if self.where.is_remote else self._acquire_local(wait)
        if taken is not None:
            log.warning("%s: took over the lease of %s, whose holder is gone; going on from what it finished",
                        self.where, describe(taken))
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease {self.where}", daemon=True)
        self._renewer.start()
        return self

    def _refusal(self, record: dict[str, Any] | None) -> LeaseHeld:
        return LeaseHeld(f"{self.what} {self.where} is being written by another driver: {describe(record)}; "
                         "wait for it with --wait (then this one resumes), or stop that driver")

    def _acquire_local(self, wait: bool) -> dict[str, Any] | None:
        path = self.where.local / self.name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + _PROBE_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    if not wait:
                        raise self._refusal(_read_local(path)) from None
                    log.info("%s: waiting for the lease held by %s", self.where, describe(_read_local(path)))
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    break
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        previous = _read_local(path)
        self._write_local()
        live = previous is not None and previous.get("token") and not previous.get("released_at")
        return previous if live else None

    def _write_local(self, **extra: Any) -> None:
        """Rewrite the record in place (the locked file must keep its inode): new bytes, then the
        length; a reader catching the moment in between retries (:func:`_read_local`)."""
        assert self._fd is not None
        data = self._record(**extra)
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def _acquire_remote(self, wait: bool) -> dict[str, Any] | None:
        remote = self.where.remote
        waiting_logged = False
        while True:
            self.started_at = self.renewed_at = time.time()  # the record's times: what its holder counts from
            if remote.create(self.name, self._record()):
                return None
            record = _decode(remote.read(self.name))
            if record is None:
                continue  # released (or unreadable) just now: try again
            released = bool(record.get("released_at"))  # e.g. a local folder's record copied into the bucket
            if released or _expired(record, self.ttl_s):
                remote.remove(self.name)
                if remote.create(self.name, self._record()):
                    time.sleep(0.5)  # two drivers taking over at once: the later create wins; confirm
                    if (_decode(remote.read(self.name)) or {}).get("token") == self.token:
                        return None if released else record
                continue
            if not wait:
                raise self._refusal(record)
            if not waiting_logged:
                log.info("%s: waiting for the lease held by %s", self.where, describe(record))
                waiting_logged = True
            time.sleep(min(5.0, self.ttl_s / 10))

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self.where.is_remote:
            if self.lost is None and (_decode(self.where.remote.read(self.name)) or {}).get("token") == self.token:
                self.where.remote.remove(self.name)
            return
        if self._fd is not None:
            try:
                self._write_local(released_at=time.time())
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    # renewal

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 10):
            try:
                self._renew()
            except LeaseLost as exc:
                self.lost = str(exc)
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried at the next tick
                log.warning("%s: renewing the lease failed: %s", self.where, exc)

    def _renew(self) -> None:
        now = time.time()
        if not self.where.is_remote:
            self.renewed_at = now
            self._write_local()
            return
        if now - self.renewed_at > self.ttl_s / 2:
            raise LeaseLost(f"{self.where}: this driver could not renew its lease for {now - self.renewed_at:.0f} s "
                            "(paused, or the store unreachable); it may have been taken over, so this driver "
                            "stops publishing: run again to resume")
        record = _decode(self.where.remote.read(self.name))
        if record is None or record.get("token") != self.token:
            raise LeaseLost(f"{self.where}: this driver's lease was taken over by {describe(record)}; it stops "
                            "publishing")
        self.renewed_at = now
        self.where.remote.write(self.name, self._record())

    def ensure(self) -> None:
        """Raise :class:`LeaseLost` when renewal found the lease gone."""
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def holder(where: str | Path | Location, name: str = LEASE_FILE) -> dict[str, Any] | None:
    """The live holder's record of the lease on ``where``, or None; never blocks nor takes it
    (read-only commands use it to say a run is still being written)."""
    where = Location.of(where)
    if where.is_remote:
        record = _decode(where.remote.read(name))
        live = record is not None and not record.get("released_at") and not _expired(record, DEFAULT_TTL_S)
        return record if live else None
    path = where.local / name
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_local(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
