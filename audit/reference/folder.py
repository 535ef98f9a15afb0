"""A reference folder in the LAION / clip-retrieval layout, and its validation.

``img_emb/img_emb_{i}.npy`` (float16 rows, L2-normalised) aligned row for row with
``metadata/metadata_{i}.parquet`` (``key``, ``url``, ``caption``, ...). Folders memaudit writes
add ``rejected/rejected_{i}.parquet`` (rows that could not be embedded, with reasons),
``_markers/{i}.json`` (written last; a shard without one is redone) and ``embedding.json`` (the
model id and dimension). Existing LAION folders have only the first two and are read as they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from audit.errors import InputError
from audit.files import MARKERS, write_bytes_atomic

EMB_DIR, META_DIR, REJECTED_DIR = "img_emb", "metadata", "rejected"
EMBEDDING_JSON = "embedding.json"
_EMB = re.compile(r"^img_emb_(\d+)\.npy$")
NORM_TOLERANCE = 1e-2


def emb_path(root: Path, index: int) -> Path:
    return root / EMB_DIR / f"img_emb_{index}.npy"


def meta_path(root: Path, index: int) -> Path:
    return root / META_DIR / f"metadata_{index}.parquet"


def rejected_path(root: Path, index: int) -> Path:
    return root / REJECTED_DIR / f"rejected_{index}.parquet"


def marker_path(root: Path, index: int) -> Path:
    return root / MARKERS / f"{index}.json"


def read_embedding_json(root: Path) -> dict[str, Any] | None:
    path = root / EMBEDDING_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def write_embedding_json(root: Path, model_id: str, dim: int) -> None:
    write_bytes_atomic(root / EMBEDDING_JSON, json.dumps({"model_id": model_id, "dim": dim, "dtype": "float16",
                                                          "metric": "inner_product"}, indent=2).encode())


def shard_complete(root: Path, index: int) -> bool:
    path = marker_path(root, index)
    if not path.is_file():
        return False
    try:
        marker = json.loads(path.read_text())
    except ValueError:
        return False
    files = {emb_path(root, index): marker.get("emb_bytes"), meta_path(root, index): marker.get("meta_bytes")}
    return all(p.is_file() and p.stat().st_size == size for p, size in files.items())


@dataclass(frozen=True)
class EmbeddingFile:
    index: int
    npy: Path
    meta: Path
    rows: int


@dataclass
class FolderCheck:
    """A validated embedding folder: its files, dimension, and the rows to leave out."""

    root: Path
    dim: int
    dtype: str
    files: list[EmbeddingFile]
    model_id: str | None
    excluded: dict[tuple[int, int], str] = field(default_factory=dict)  # (file index, row) -> reason
    renormalised_rows: int = 0
    duplicate_keys: int = 0

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)


def list_files(root: Path) -> list[tuple[int, Path, Path]]:
    """(index, npy, metadata) pairs, by index; accepts LAION's zero-padded names too."""
    folder = root / EMB_DIR
    if not folder.is_dir():
        raise InputError(f"{root}: no {EMB_DIR}/ folder; an embedding folder holds {EMB_DIR}/img_emb_{{i}}.npy "
                         f"and {META_DIR}/metadata_{{i}}.parquet")
    pairs = []
    for npy in folder.iterdir():
        match = _EMB.match(npy.name)
        if not match:
            continue
        meta = root / META_DIR / f"metadata_{match.group(1)}.parquet"
        if not meta.is_file():
            raise InputError(f"{npy}: no matching {META_DIR}/{meta.name}; every img_emb file needs its metadata file")
        pairs.append((int(match.group(1)), npy, meta))
    if not pairs:
        raise InputError(f"{folder}: no img_emb_{{i}}.npy files")
    return sorted(pairs)


def validate_folder(root: Path, scan_rows: bool = True) -> FolderCheck:
    """Check an embedding folder (memaudit's or a precomputed LAION one).

    Structural problems are errors (what, which file, how to fix): unreadable files, mixed
    dimensions, unsupported dtypes, embedding rows vs metadata rows. Bad rows are not: NaN, Inf
    and all-zero rows are recorded as exclusions with their reason; rows whose norm is off by
    more than 1% are counted (indexes re-normalise them).
    """
    files: list[EmbeddingFile] = []
    dim: int | None = None
    dtype: str | None = None
    check = FolderCheck(root, 0, "", files, (read_embedding_json(root) or {}).get("model_id"))
    keys: set[str] = set()
    for index, npy, meta in list_files(root):
        try:
            emb = np.load(npy, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise InputError(f"{npy}: not a readable .npy file ({exc})") from None
        if emb.ndim != 2:
            raise InputError(f"{npy}: expected a 2-d array (rows x dim), got shape {emb.shape}")
        if emb.dtype not in (np.float16, np.float32):
            raise InputError(f"{npy}: dtype {emb.dtype} is not supported; embeddings must be float16 or float32")
        if dim is not None and emb.shape[1] != dim:
            raise InputError(f"{npy}: dimension {emb.shape[1]} differs from {dim} in the other files; "
                             "one folder holds one embedding model")
        dim, dtype = emb.shape[1], str(emb.dtype)
        try:
            meta_file = pq.ParquetFile(meta)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{meta}: not a readable Parquet file ({exc})") from None
        n_meta = meta_file.metadata.num_rows
        if n_meta != emb.shape[0]:
            raise InputError(f"{npy} has {emb.shape[0]} rows but {meta} has {n_meta}; they must align row for row "
                             "(re-export this shard)")
        if "key" in meta_file.schema_arrow.names:
            for key in pq.read_table(meta, columns=["key"]).column("key").to_pylist():
                if key in keys:
                    check.duplicate_keys += 1
                keys.add(key)
        files.append(EmbeddingFile(index, npy, meta, int(emb.shape[0])))
        if scan_rows:
            _scan_rows(check, index, emb)
    check.dim, check.dtype = int(dim or 0), str(dtype)
    recorded = read_embedding_json(root)
    if recorded and int(recorded.get("dim", check.dim)) != check.dim:
        raise InputError(f"{root / EMBEDDING_JSON}: says dim {recorded['dim']} but the files have {check.dim}")
    return check


def _scan_rows(check: FolderCheck, index: int, emb: np.ndarray, block: int = 65_536) -> None:
    for start in range(0, emb.shape[0], block):
        rows = np.asarray(emb[start : start + block], dtype=np.float32)
        finite = np.isfinite(rows)
        norms = np.linalg.norm(np.where(finite, rows, 0.0), axis=1)
        for j in np.flatnonzero(np.isnan(rows).any(axis=1)):
            check.excluded[(index, start + int(j))] = "nan: the embedding has NaN values"
        for j in np.flatnonzero(np.isinf(rows).any(axis=1) & ~np.isnan(rows).any(axis=1)):
            check.excluded[(index, start + int(j))] = "inf: the embedding has infinite values"
        for j in np.flatnonzero(finite.all(axis=1) & (norms == 0)):
            check.excluded[(index, start + int(j))] = "zero: the embedding is all zeros"
        off = finite.all(axis=1) & (norms > 0) & (np.abs(norms - 1) > NORM_TOLERANCE)
        check.renormalised_rows += int(off.sum())
