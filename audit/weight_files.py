"""Is a pipeline folder whole? Checked from file headers, before any weights are loaded.

An interrupted download or copy leaves a folder that ``from_pretrained`` rejects minutes later
on a worker, or worse, loads with missing tensors. Every component that ``model_index.json``
lists must have its folder; every model component (one with a ``config.json``) must have
weights; a safetensors file must be as long as its header says, and a sharded checkpoint must
have every shard its index names.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from audit.errors import InputError

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})  # formats that can run code when loaded
MAX_HEADER_BYTES = 100 * 2**20


def check_complete(folder: Path, allow_pickle: bool) -> None:
    """Raise :class:`InputError` naming the first missing or truncated part of ``folder``."""
    index = json.loads((folder / "model_index.json").read_text())
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        component = folder / name
        if not component.is_dir():
            raise InputError(f"model.path: {folder} lists component {name!r} in model_index.json but has no "
                             f"{name}/ folder; the checkpoint is incomplete, copy or download it again")
        if (component / "config.json").is_file():
            _check_weights(folder, component, allow_pickle)


def _check_weights(folder: Path, component: Path, allow_pickle: bool) -> None:
    files = [f for f in component.iterdir() if f.is_file()]
    tensors = sorted(f for f in files if f.name.endswith(".safetensors"))
    pickled = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    for index_file in sorted(component.glob("*.safetensors.index.json")):
        shards = set(json.loads(index_file.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (component / s).is_file())
        if missing:
            raise InputError(f"model.path: {index_file.relative_to(folder)} names shards that are missing "
                             f"({', '.join(missing)}); the checkpoint is incomplete, copy or download it again")
    if not tensors and not (allow_pickle and pickled):
        raise InputError(f"model.path: component {component.name!r} of {folder} has a config.json but no "
                         "weights file; the checkpoint is incomplete, copy or download it again")
    for path in tensors:
        _check_safetensors(folder, path)


def _check_safetensors(folder: Path, path: Path) -> None:
    """The header parses and the file holds every byte the header's tensors need."""
    size = path.stat().st_size
    name = path.relative_to(folder)
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len}")
            header = json.loads(handle.read(header_len))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise InputError(f"model.path: {name} is not a readable safetensors file ({exc}); "
                         "copy or download the checkpoint again") from None
    expected = 8 + header_len + end
    if size < expected:
        raise InputError(f"model.path: {name} is truncated ({size} of {expected} bytes); the download or copy "
                         "did not finish, fetch the checkpoint again")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from a safetensors file's header (no tensor is loaded)."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if not 0 < header_len <= MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len}")
        header = json.loads(handle.read(header_len))
    return {name: tuple(int(d) for d in value["shape"]) for name, value in header.items() if name != "__metadata__"}
