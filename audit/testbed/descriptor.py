"""The testbed's copy detector: a TorchScript pixel descriptor (``embedding: builtin testbed-copy``).

No pretrained copy-detection network (SSCD, DINO) can be downloaded here, and the testbed's
32x32 images are small enough for pixels to be a faithful copy descriptor: the image at 16x16,
each channel centred, laid out tile by tile (4x4 tiles) so that the split-product of Somepalli et
al. with 16 chunks compares tile with tile. It is saved and loaded as TorchScript, exactly like
SSCD, so the testbed exercises the copy-detector loading path users take.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

SIZE = 16
GRID = 4
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class PixelDescriptor(torch.nn.Module):
    """(B, 3, 16, 16) normalised pixels -> (B, 768) centred pixels, tile-major."""

    def __init__(self, grid: int = GRID) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        centred = x - x.mean(dim=(2, 3), keepdim=True)
        g = self.grid
        tiles = centred.reshape(b, c, g, h // g, g, w // g).permute(0, 2, 4, 1, 3, 5)
        flat = tiles.reshape(b, c * h * w)
        # A flat image has no pattern to copy: give it a zero row (excluded from indexes) rather
        # than a direction made of rounding noise.
        return flat * ((flat * flat).sum(dim=1, keepdim=True) > 1e-6).to(flat.dtype)


def save_descriptor(path: Path) -> Path:
    """Script the descriptor and save it as a TorchScript file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is how SSCD ships; keep its path
        torch.jit.script(PixelDescriptor()).save(str(path))
    return path
