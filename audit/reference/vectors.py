"""Global row numbers over an embedding folder, and exact vectors fetched by row (memory-mapped).

Row ``g`` of a folder is row ``g - first_row[i]`` of ``img_emb_{i}.npy`` for the file ``i`` whose
range holds it; index shards, neighbors and duplicate counts all speak in these rows, and the
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

    @property
    def dim(self) -> int:
        return int(self._map(0).shape[1])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file position, row within file) of each global row."""
        which = np.searchsorted(self.first_rows, rows, side="right") - 1
        return which, rows - self.first_rows[which]

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors as stored (not re-normalised) for a 1-d array of global rows; rows < 0
        give zeros. One gather per file, no intermediate copies."""
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        valid = flat >= 0
        which, local = self.locate(np.where(valid, flat, 0))
        if len(self.files) == 1 and valid.all():
            return self._map(0)[local].astype(np.float32)
        out = np.zeros((flat.size, self.dim), np.float32)
        for i in np.unique(which[valid]):
            sel = np.flatnonzero(valid & (which == i))
            out[sel] = self._map(int(i))[local[sel]]
        return out

    def get(self, rows: np.ndarray) -> np.ndarray:
        """float32 unit rows for the given global rows (any shape); rows < 0 give zeros."""
        return normalise(self.raw(rows)).reshape(*np.shape(rows), self.dim)

    def cosine(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact cosine of each unit query ``queries[i]`` (n, d) with the rows ``rows[i]`` (n, f);
        rows < 0 (and zero vectors) give -inf."""
        vectors = self.raw(rows).reshape(*rows.shape, self.dim)
        dots = np.matmul(vectors, queries[:, :, None])[..., 0]
        norms = np.sqrt(np.einsum("nfd,nfd->nf", vectors, vectors))
        return np.divide(dots, norms, out=np.full(dots.shape, -np.inf, np.float32), where=norms > 0)


def normalise(rows: np.ndarray) -> np.ndarray:
    """Unit rows (zero rows stay zero)."""
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
