"""Built-in checkpoints (``model.path: builtin:<name>``).

``builtin:testbed`` is the trained testbed shipped in the package; the others are built once
into the cache (:func:`audit.files.cached_build`). Building is deterministic (seeded), so every machine of a
cluster builds the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from audit.errors import InputError
from audit.files import cache_root, cached_build
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
