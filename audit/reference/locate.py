"""Finding a reference folder on this machine (``reference.path``).

A folder, an object-store URI (mirrored into the local cache; only files not there yet are
fetched) or ``builtin:<name>``. ``builtin:testbed`` (and ``builtin:testbed-maps``) is that shipped
testbed's training set, embedded with the testbed's copy descriptor, indexed and duplicate-counted,
each in its own cache folder; it is *built* by the pipeline
(:func:`audit.pipeline.reference.prepare_reference`, which may start Ray), never here, so readers
such as the report never start a cluster.
"""

from __future__ import annotations

from pathlib import Path

from audit.errors import InputError
from audit.files import cache_root
from audit.location import Location

# Built-in reference (a shipped testbed's name, audit.testbed.checkpoints.SHIPPED) -> its cache folder.
# Each testbed has its own folder: one built for one testbed must never answer for the other.
BUILTIN_REFERENCES = {"testbed": "testbed-reference-v1", "testbed-maps": "testbed-maps-reference-v1"}
BUILTIN_PREFIX = "builtin:"


def builtin_reference_folder(path: str) -> Path:
    """Where a built-in reference lives in the cache (built or not)."""
    name = path.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_REFERENCES:
        raise InputError(f"reference.path: unknown built-in reference {path!r}; available: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_REFERENCES)}")
    return cache_root() / "builtin" / BUILTIN_REFERENCES[name]


def builtin_reference_name(path: str) -> str:
    """The shipped testbed a built-in reference is built from (``builtin:testbed-maps`` ->
    ``testbed-maps``), refusing names that are not built-in references."""
    builtin_reference_folder(path)
    return path.removeprefix(BUILTIN_PREFIX)


def is_built(folder: Path) -> bool:
    return (folder / "index" / "manifest.json").is_file()


def resolve_reference(path: str | Location) -> Path:
    """The reference folder on this machine; a clear error when a built-in one was never built."""
    if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
        folder = builtin_reference_folder(path)
        if not is_built(folder):
            raise InputError(f"reference.path {path}: not built on this machine yet; `memaudit reference testbed` "
                             "or `memaudit run` builds it")
        return folder
    where = Location.of(path)
    if where.is_remote:
        return where.materialize("reference.path")
    if not where.local.is_dir():
        raise InputError(f"reference.path: {where.local} is not a folder; build one with `memaudit reference embed` "
                         "and `memaudit reference index`")
    return where.local
