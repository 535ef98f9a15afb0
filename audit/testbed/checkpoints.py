"""Built-in checkpoints (``model.path: builtin:<name>``).

``builtin:testbed`` (glyphs) and ``builtin:testbed-maps`` (maps, a testbed of another kind to
validate thresholds on) are trained testbeds shipped in the package, and so is the LoRA testbed
(``trained_lora/``: an adapter of ``builtin:testbed``, not a checkpoint of its own; its prompts are
``builtin:testbed-lora``); the others are built once
into the cache (:func:`audit.files.cached_build`). Building is deterministic (seeded), so every machine of a
cluster builds the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from audit.errors import InputError
from audit.files import cache_root, cached_build
from audit.testbed.architectures import TINY, build_pipeline, save_pipeline
from audit.testbed.families import FAMILIES, build_family

log = logging.getLogger(__name__)


def _build_tiny(folder: Path) -> None:
    save_pipeline(build_pipeline(TINY, seed=0), folder)


def _build_family(name: str, folder: Path) -> None:
    save_pipeline(build_family(name, 0), folder)


# builtin name -> (cache folder name, builder). Bump a folder's version when its builder changes.
BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny": ("tiny-v1", _build_tiny),
    # Tiny pipelines of other diffusers families (audit.testbed.families): builtin:tiny-sdxl, ...
    **{f"tiny-{name}": (f"tiny-{name}-v1", partial(_build_family, name)) for name in FAMILIES},
}


def testbed_folder() -> Path:
    """The trained glyph testbed shipped inside the package (see its README.md model card)."""
    return Path(__file__).parent / "trained"


def maps_testbed_folder() -> Path:
    """The trained maps testbed shipped inside the package (see its README.md model card)."""
    return Path(__file__).parent / "trained_maps"


def lora_testbed_folder() -> Path:
    """The LoRA testbed shipped inside the package: a LoRA adapter of ``builtin:testbed``
    fine-tuned on a small set with planted duplicates (see its README.md model card)."""
    return Path(__file__).parent / "trained_lora"


def lora_testbed_adapter() -> Path:
    """The shipped LoRA testbed's adapter (diffusers' ``pytorch_lora_weights.safetensors``): load
    it onto ``builtin:testbed`` with ``pipe.load_lora_weights``."""
    return lora_testbed_folder() / "adapter" / "pytorch_lora_weights.safetensors"


LORA_TESTBED = "testbed-lora"  # the LoRA testbed's name (prompts: builtin:testbed-lora)
LORA_BASE = "testbed"  # the builtin checkpoint its adapter is trained on and loads onto

# Each shipped testbed's folder (pipeline/, audit_prompts.txt, metrics.json, ...) by builtin name.
SHIPPED: dict[str, Callable[[], Path]] = {"testbed": testbed_folder, "testbed-maps": maps_testbed_folder}
# The builtin name of the shipped testbed of each dataset kind (audit.testbed.dataset.KINDS), and
# of the LoRA testbed ("lora": glyphs too, a fine-tuning set on builtin:testbed): the choices of
# `memaudit reference testbed --testbed`.
SHIPPED_KINDS = {"glyphs": "testbed", "maps": "testbed-maps", "lora": LORA_TESTBED}


def shipped_folder(name: str) -> Path:
    """The packaged folder of the shipped testbed ``name`` (``testbed`` or ``testbed-maps``)."""
    if name not in SHIPPED:
        raise InputError(f"unknown shipped testbed 'builtin:{name}'; available: "
                         f"{', '.join('builtin:' + n for n in SHIPPED)}")
    return SHIPPED[name]()


def builtin_checkpoint(name: str) -> Path:
    """The folder of a built-in checkpoint, building it on first use."""
    if name in SHIPPED:
        folder = shipped_folder(name) / "pipeline"
        if not (folder / "model_index.json").is_file():
            raise InputError(f"model.path: the built-in {name} is missing from {folder}; reinstall memaudit")
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
