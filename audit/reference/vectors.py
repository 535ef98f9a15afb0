"""Global row numbers over an embedding folder, and exact vectors fetched by row (memory-mapped).

Row ``g`` of a folder is row ``g - first_row[i]`` of ``img_emb_{i}.npy`` for the file ``i`` whose
range holds it; index shards, neighbours and duplicate counts all speak in these rows, and the
manifest records each file's ``first_row`` so a row maps back to its metadata ``key``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VectorStore:
    """Exact reference vectors by global row, read through memory maps (nothing loaded up front)."""

    def __init__(self, npy_files: list[Path], first_rows: list[int]) -> None:
        self.files = npy_files
        self.first_rows = np.asarray(first_rows, dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.load(self.files[i], mmap_mode="r")
        return self._maps[i]

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file position, row within file) of each global row."""
        which = np.searchsorted(self.first_rows, rows, side="right") - 1
        return which, rows - self.first_rows[which]

    def get(self, rows: np.ndarray) -> np.ndarray:
        """float32 unit rows for the given global rows (any shape); rows < 0 give zeros."""
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        dim = self._map(0).shape[1]
        out = np.zeros((flat.size, dim), np.float32)
        valid = flat >= 0
        which, local = self.locate(np.where(valid, flat, 0))
        for i in np.unique(which[valid]):
            sel = valid & (which == i)
            order = np.argsort(local[sel])  # sorted reads are kinder to the page cache
            picked = np.asarray(self._map(int(i))[local[sel][order]], dtype=np.float32)
            block = np.empty_like(picked)
            block[order] = picked
            out[np.flatnonzero(sel)] = block
        return normalise(out).reshape(*np.shape(rows), dim)


def normalise(rows: np.ndarray) -> np.ndarray:
    """Unit rows (zero rows stay zero)."""
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
