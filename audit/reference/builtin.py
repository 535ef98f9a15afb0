"""Built-in reference sets (``reference.path: builtin:<name>``).

``builtin:testbed`` is the testbed's training set (every pair as often as it was trained on),
embedded with the testbed's copy descriptor, indexed and duplicate-counted; it is built once into
the memaudit cache (written under a temporary name and renamed) and reused by every run.
"""

from __future__ import annotations

from pathlib import Path

from audit.config import load_config
from audit.errors import InputError
from audit.remote import is_uri

BUILTIN_REFERENCES = ("testbed",)


def _build_testbed(folder: Path) -> None:
    from audit.pipeline.reference import embed_reference
    from audit.reference.dups import write_dups
    from audit.reference.index import build_index
    from audit.reference.search import ReferenceIndex
    from audit.reference.testbed import write_shipped_training_set

    cfg = load_config(None)  # the built-in defaults: builtin:testbed-copy embedding, Flat index
    source = write_shipped_training_set(folder)
    report = embed_reference(cfg, source, folder)
    if report.shards_failed:
        raise RuntimeError(f"embedding the testbed reference failed: {report.shards_failed}")
    build_index(folder, cfg.reference)
    write_dups(folder, ReferenceIndex(folder), cfg.reference.dup_threshold)


def resolve_reference(path: str) -> Path:
    """The reference folder on this machine, building a built-in one on first use (the marker
    source paths inside a built folder are absolute, so it is built at its final place) or
    mirroring an object-store URI into the local cache (only files not there yet are fetched)."""
    if is_uri(path):
        from audit.remote import materialize

        return materialize(path, "reference.path")
    if not path.startswith("builtin:"):
        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"reference.path: {folder} is not a folder; build one with `memaudit reference embed` "
                             "and `memaudit reference index`")
        return folder
    name = path.removeprefix("builtin:")
    if name not in BUILTIN_REFERENCES:
        raise InputError(f"reference.path: unknown built-in reference {path!r}; available: "
                         f"{', '.join('builtin:' + n for n in BUILTIN_REFERENCES)}")
    from audit.testbed.builtin import cache_root

    folder = cache_root() / "builtin" / "testbed-reference-v1"
    if not (folder / "index" / "manifest.json").is_file():
        _build_testbed(folder)  # resumable: embedded shards and index shards are kept across attempts
    return folder
