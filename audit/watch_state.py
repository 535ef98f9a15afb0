"""Where ``memaudit watch`` keeps its state, and how it finds checkpoints: on a file system or in
an object store.

State of a model lives under ``<run.root>/.watch/<model>/``: ``<checkpoint>.json`` once its audit
finished, ``<checkpoint>.compared.json`` once it was compared with its predecessor, and
``<checkpoint>.lock`` while an invocation audits it. The lock is a lease (:mod:`audit.lease`, the
mechanism every writer of a folder uses): an ``flock`` on a file system, released by the kernel
when its holder dies; in a bucket an object created with a conditional PUT, renewed by its
holder and taken over once not renewed for the TTL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from audit import layout
from audit.errors import InputError
from audit.weight_files import tensor_shapes
from audit.files import write_bytes_atomic
from audit.lease import DEFAULT_TTL_S, Lease, LeaseHeld
from audit.location import Location

log = logging.getLogger(__name__)
STATE_DIR = ".watch"


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class WatchState(Protocol):
    def read(self, name: str) -> dict[str, Any] | None: ...
    def write(self, name: str, obj: dict[str, Any]) -> None: ...
    def lock(self, name: str, ttl_s: float = DEFAULT_TTL_S) -> Any: ...  # yields True when this invocation holds it


def state_for(run_root: str | Path | Location, model: str) -> WatchState:
    where = Location.of(run_root).join(STATE_DIR, model)
    return BucketState(where) if where.is_remote else FolderState(where.local)


class FolderState:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, name: str, obj: dict[str, Any]) -> None:
        write_bytes_atomic(self.folder / name, json.dumps(obj, indent=2).encode())

    def lock(self, name: str, ttl_s: float = DEFAULT_TTL_S) -> Any:
        return held(Location(self.folder), name, ttl_s)


@contextmanager
def held(where: Location, name: str, ttl_s: float = DEFAULT_TTL_S) -> Iterator[bool]:
    """Hold the lease ``name`` in ``where`` if no live invocation does (yields False otherwise)."""
    try:
        lease = Lease(where, "watch lock", name=name, ttl_s=ttl_s, command="memaudit watch").acquire(wait=False)
    except LeaseHeld:
        yield False
        return
    with lease:
        yield True


class BucketState:
    def __init__(self, where: str | Location) -> None:
        self.where = Location.of(where)
        self.remote = self.where.remote

    def read(self, name: str) -> dict[str, Any] | None:
        data = self.remote.read(name)
        return json.loads(data) if data is not None else None

    def write(self, name: str, obj: dict[str, Any]) -> None:
        self.remote.write(name, json.dumps(obj, indent=2).encode())

    def lock(self, name: str, ttl_s: float = DEFAULT_TTL_S) -> Any:
        return held(self.where, name, ttl_s)


def find_checkpoints(where: str | Path | Location) -> list[Location]:
    """Diffusers folders (holding ``model_index.json``) under ``where`` (itself included), in
    natural path order."""
    folder = Location.of(where)
    if folder.is_remote:
        names = folder.remote.inventory()
        rels = {rel.rsplit("/", 1)[0] if "/" in rel else "" for rel in names if rel.split("/")[-1] == "model_index.json"}
        rels = {r for r in rels if STATE_DIR not in r.split("/")}
        return [folder.join(*r.split("/")) if r else folder for r in sorted(rels, key=natural_key)]
    path = folder.local
    if not path.is_dir():
        raise InputError(f"watch: {path} is not a folder; pass the folder your training job writes checkpoints to")
    found = {p.parent for p in path.rglob("model_index.json") if STATE_DIR not in p.parts}
    return [Location(p) for p in sorted(found, key=lambda p: natural_key(str(p.relative_to(path))))]


_LORA_TENSOR = re.compile(r"(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$")


def is_lora_file(path: Path) -> bool:
    """A safetensors file holding LoRA matrices (read from its header)."""
    try:
        return any(_LORA_TENSOR.search(name) for name in tensor_shapes(path))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_adapters(where: str | Path | Location) -> list[Location]:
    """LoRA adapter files (``*.safetensors`` holding LoRA matrices) under a local folder, outside
    any diffusers folder and the watch state, in natural path order: the checkpoints of a
    fine-tuning job that saves one adapter per step."""
    folder = Location.of(where)
    if folder.is_remote or not folder.local.is_dir():
        return []
    path = folder.local
    pipelines = {p.parent for p in path.rglob("model_index.json")}
    found = [p for p in path.rglob("*.safetensors")
             if STATE_DIR not in p.parts and not any(d in p.parents for d in pipelines) and is_lora_file(p)]
    return [Location(p) for p in sorted(found, key=lambda p: natural_key(str(p.relative_to(path))))]


def signature(checkpoint: Location) -> str:
    """Names, sizes and mtimes (ETags in a bucket) of a checkpoint's files: changes when it is overwritten."""
    digest = hashlib.sha256()
    if checkpoint.is_remote:
        for rel, (size, version) in sorted(checkpoint.remote.inventory().items()):
            digest.update(f"{rel}\0{size}\0{version}\n".encode())
        return digest.hexdigest()[:16]
    folder = checkpoint.local
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder) if path != folder else path.name}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def run_exists(run: str) -> bool:
    """The run folder (path or URI) recorded in a done marker still holds its run.json."""
    where = Location.of(run)
    if where.is_remote:
        return where.remote.read(layout.RUN_JSON) is not None
    return (where.local / layout.RUN_JSON).is_file()
