"""The embedding stage: image bytes in, L2-normalised float16 embeddings out (Ray-free).

Used for generated samples and reference images alike, so both sides of a comparison go through
the same decoding and preprocessing. Rows that do not decode get a zero embedding and
``status='error'`` with the reason; they are never dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from audit.config import EmbeddingSection
from audit.embed.decode import Decoded, decode_image
from audit.embed.models import Embedder, load_embedder
from audit.schema import STATUS_ERROR, STATUS_OK


class EmbedStage:
    """``__call__({"image": bytes per row}) -> {"embedding", "status", "error", "note", "width", "height"}``."""

    def __init__(self, section: EmbeddingSection, device: str = "auto", embedder: Embedder | None = None) -> None:
        self.section = section
        self.embedder = embedder or load_embedder(section, device)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = [decode_image(data, self.section.max_image_pixels) for data in batch["image"]]
        return self.embed_decoded(decoded)

    def embed_decoded(self, decoded: list[Decoded]) -> dict[str, np.ndarray]:
        n = len(decoded)
        embeddings = np.zeros((n, self.dim), np.float16)
        errors: list[str | None] = [d.error for d in decoded]
        good = [i for i, d in enumerate(decoded) if d.ok]
        size = self.section.batch_size
        for start in range(0, len(good), size):
            chunk = good[start : start + size]
            pixels, kept = [], []
            for i in chunk:
                try:
                    pixels.append(self.embedder.preprocess(decoded[i].image))
                    kept.append(i)
                except (OSError, ValueError, RuntimeError) as exc:
                    errors[i] = f"preprocess: {type(exc).__name__}: {exc}"
            if kept:
                rows = self.embedder.embed(torch.stack(pixels))
                bad = ~np.isfinite(rows).all(axis=1)
                for j in np.flatnonzero(bad):
                    errors[kept[j]] = "embedding: the model returned non-finite values"
                embeddings[kept] = np.where(bad[:, None], 0.0, rows).astype(np.float16)
        return {
            "embedding": embeddings,
            "status": np.array([STATUS_ERROR if e else STATUS_OK for e in errors], dtype=object),
            "error": np.array(errors, dtype=object),
            "note": np.array([d.note for d in decoded], dtype=object),
            "width": np.array([d.width or 0 for d in decoded], dtype=np.int32),
            "height": np.array([d.height or 0 for d in decoded], dtype=np.int32),
        }
