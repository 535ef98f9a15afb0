"""Built-in checkpoints (``model.path: builtin:<name>``).

``builtin:testbed`` is the trained testbed shipped in the package; the others are built once
into a cache folder. Building is deterministic (seeded), so every machine of a cluster builds the same bytes; the
folder is written under a temporary name and renamed, so concurrent builders never see half of it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from audit.errors import InputError
from audit.testbed.architectures import TINY, build_pipeline, save_pipeline

log = logging.getLogger(__name__)


def _build_tiny(folder: Path) -> None:
    save_pipeline(build_pipeline(TINY, seed=0), folder)


BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny": ("tiny-v1", _build_tiny),
}
SHIPPED = ("testbed",)


def testbed_folder() -> Path:
    """The trained testbed shipped inside the package (see its README.md model card)."""
    return Path(__file__).parent / "trained"


def cache_root() -> Path:
    """``$MEMAUDIT_CACHE``, else ``~/.cache/memaudit``."""
    return Path(os.environ.get("MEMAUDIT_CACHE", Path.home() / ".cache" / "memaudit"))


def builtin_checkpoint(name: str) -> Path:
    """The folder of a built-in checkpoint, building it on first use."""
    if name == "testbed":
        folder = testbed_folder() / "pipeline"
        if not (folder / "model_index.json").is_file():
            raise InputError(f"model.path: the built-in testbed is missing from {folder}; reinstall memaudit")
        return folder
    if name not in BUILDERS:
        raise InputError(
            f"model.path: unknown built-in checkpoint 'builtin:{name}'; "
            f"available: {', '.join('builtin:' + n for n in (*SHIPPED, *BUILDERS))}"
        )
    folder_name, build = BUILDERS[name]
    folder = cache_root() / "builtin" / folder_name
    if (folder / "model_index.json").is_file():
        return folder
    log.info("building built-in checkpoint %s into %s", name, folder)
    return cached_build(folder_name, build)


def cached_build(name: str, build: Callable[[Path], object]) -> Path:
    """``cache_root()/builtin/<name>``, built by ``build(path)`` on first use. The result is
    written under a temporary name and renamed, so concurrent builders never see half of it."""
    final = cache_root() / "builtin" / name
    if final.exists():
        return final
    tmp = final.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
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
