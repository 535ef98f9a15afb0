"""LoRA adapters on top of a checkpoint (``model.lora``; docs/model_families.md, "LoRA").

An adapter is a safetensors file in the diffusers/peft layout (``<component>.<module>.lora_A.weight``
and ``lora_B``, as ``save_lora_weights`` writes it), a folder holding one, an object-store URI of
one, or ``builtin:testbed-lora``. Pickle-based files load only with ``model.allow_pickle``. Before
any worker starts, every adapter's tensor shapes are checked against the base checkpoint's weights
from both files' headers (no tensor is loaded): an adapter trained for another architecture is
refused with the module that does not fit. Each adapter's content hash and scale join the
checkpoint identity, so base + adapter is another checkpoint than the base alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from audit.config import LoraAdapter, ModelSection
from audit.errors import InputError
from audit.location import Location
from audit.weight_files import PICKLE_SUFFIXES, tensor_shapes

BUILTIN_LORA = "builtin:testbed-lora"
_LORA_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up)\.weight$")


@dataclass(frozen=True)
class ResolvedAdapter:
    """One configured adapter, located on this machine and hashed."""

    ref: str  # as configured
    file: Path
    scale: float
    sha256: str
    bytes: int

    def record(self) -> dict[str, Any]:
        """What run.json records about it."""
        return {"path": self.ref, "file": self.file.name, "scale": self.scale, "sha256": self.sha256,
                "bytes": self.bytes}


def _locate(adapter: LoraAdapter, key: str, allow_pickle: bool) -> Path:
    if adapter.path == BUILTIN_LORA:
        from audit.testbed.checkpoints import lora_testbed_adapter

        return lora_testbed_adapter()
    if adapter.path.startswith("builtin:"):
        raise InputError(f"{key}: unknown built-in adapter {adapter.path!r}; available: {BUILTIN_LORA}")
    where = Location.of(adapter.path)
    path = where.materialize(key) if where.is_remote else Path(adapter.path).expanduser()
    if not path.exists():
        raise InputError(f"{key}: {path} does not exist; give a LoRA .safetensors file or a folder holding one")
    if path.is_dir():
        tensors = sorted(path.glob("*.safetensors"))
        pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        preferred = [p for p in tensors if p.name == "pytorch_lora_weights.safetensors"]
        if len(tensors) == 1 or preferred:
            path = (preferred or tensors)[0]
        elif tensors:
            raise InputError(f"{key}: {path} holds several .safetensors files "
                             f"({', '.join(p.name for p in tensors)}); give the adapter's file itself")
        elif len(pickled) == 1:
            path = pickled[0]
        else:
            raise InputError(f"{key}: {path} holds no LoRA weights file (.safetensors); give the adapter's file")
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(f"{key}: {path.name} is a pickle-based file, which can run code when loaded; convert it "
                         "to safetensors, or set model.allow_pickle: true if you trust the source")
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise InputError(f"{key}: {path.name} is not a LoRA weights file (.safetensors expected)")
    return path


@lru_cache(maxsize=8)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_adapters(section: ModelSection) -> list[ResolvedAdapter]:
    """Locate and hash every configured adapter (errors name ``model.lora[i].path``)."""
    resolved = []
    for i, adapter in enumerate(section.lora):
        key = f"model.lora[{i}].path"
        path = _locate(adapter, key, section.allow_pickle)
        stat = path.stat()
        resolved.append(ResolvedAdapter(adapter.path, path.resolve(), adapter.scale,
                                        _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns), stat.st_size))
    return resolved


def _component_shapes(component: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(component.glob("*.safetensors")):
        shapes.update(tensor_shapes(path))
    return shapes


def check_adapter_fits(adapter: ResolvedAdapter, folder: Path, key: str) -> bool:
    """Refuse an adapter whose LoRA matrices do not fit the base checkpoint's modules. Returns
    False when the file's key layout is not the diffusers/peft one (then only loading can tell)."""
    if adapter.file.suffix != ".safetensors":
        return False
    try:
        lora = tensor_shapes(adapter.file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{key}: {adapter.file} is not a readable safetensors file ({exc})") from None
    components: dict[str, dict[str, tuple[int, ...]]] = {}
    checked = False
    for name, shape in sorted(lora.items()):
        match = _LORA_KEY.match(name)
        if match is None:
            continue
        component, module, part = match["component"], match["module"], match["part"]
        if component not in components:
            if not (folder / component).is_dir():
                raise InputError(f"{key}: {adapter.file.name} adapts a {component!r} component, which {folder} does "
                                 "not have; it was trained for another architecture")
            components[component] = _component_shapes(folder / component)
        base = components[component].get(f"{module}.weight")
        if base is None:
            raise InputError(f"{key}: {adapter.file.name} adapts {component}.{module}, which {folder} does not have; "
                             "it was trained for another architecture")
        down = part in ("lora_A", "lora.down")
        fits = len(shape) >= 2 and (shape[1] == base[1] if down else shape[0] == base[0])
        if not fits:
            raise InputError(f"{key}: {adapter.file.name} does not fit {component}.{module} (LoRA {part} {list(shape)} "
                             f"against weight {list(base)}); it was trained for another architecture")
        checked = True
    return checked


def checkpoint_identity(base_sha256: str, adapters: list[ResolvedAdapter]) -> str:
    """The checkpoint's content hash: the base's alone, or combined with each adapter's hash and scale."""
    if not adapters:
        return base_sha256
    text = base_sha256 + "\n" + "".join(f"lora {a.sha256} {a.scale!r}\n" for a in adapters)
    return hashlib.sha256(text.encode()).hexdigest()


def apply_adapters(pipe: Any, adapters: list[ResolvedAdapter]) -> None:
    """Load the adapters with diffusers' ``load_lora_weights`` and weight them with ``set_adapters``."""
    names = []
    for i, adapter in enumerate(adapters):
        name = f"memaudit_{i}"
        pipe.load_lora_weights(str(adapter.file.parent), weight_name=adapter.file.name, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[a.scale for a in adapters])
