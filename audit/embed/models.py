"""Image embedding models: open_clip CLIP models and TorchScript copy detectors (SSCD, DINO).

Models load through their own libraries: ``open_clip.create_model_and_transforms`` (a model name
with a pretrained tag or weights file, or ``local-dir:`` folder) and ``torch.jit.load`` (SSCD is
distributed as TorchScript). Every embedder returns L2-normalised rows and carries a ``model_id``
that manifests record, so samples and a reference index embedded by different models are never
compared.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from audit.config import EmbeddingSection
from audit.errors import InputError
from audit.weight_files import PICKLE_SUFFIXES
from audit.files import file_sha256

log = logging.getLogger(__name__)


@dataclass
class Embedder:
    """A loaded embedding model: ``preprocess`` (CPU, per image) then ``embed`` (a batch)."""

    model_id: str
    dim: int
    device: str
    preprocess: Callable[[Image.Image], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, dim) float32 rows of unit length."""
        out = self.forward(pixels.to(self.device)).float()
        out = torch.nn.functional.normalize(out.reshape(out.shape[0], -1), dim=1)
        return out.cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(torch.stack([self.preprocess(image) for image in images]))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"embedding.device: {device} but no CUDA device is visible; use auto or cpu")
    return device


def load_embedder(section: EmbeddingSection, device: str = "auto") -> Embedder:
    """Load the configured model (see :class:`audit.config.EmbeddingSection`)."""
    device = resolve_device(device if device != "auto" else section.device)
    model_id = model_id_of(section)  # also checks that the file or built-in exists
    if section.kind == "open_clip":
        return _open_clip(section, device, model_id)
    if section.kind == "torchscript":
        return _torchscript(Path(section.model).expanduser(), section.image_size, section.mean, section.std,
                            device, model_id)
    return BUILTINS[section.model](device)


def model_id_of(section: EmbeddingSection) -> str:
    """The model id an embedder of ``section`` will have, without loading weights."""
    if section.kind == "open_clip":
        return f"open_clip:{section.model}:{_weights_tag(section.pretrained)}"
    if section.kind == "torchscript":
        path = Path(section.model).expanduser()
        if not path.is_file():
            raise InputError(f"embedding.model: TorchScript file {path} does not exist")
        return f"torchscript:{path.name}:{file_sha256(path)[:12]}"
    if section.model not in BUILTINS:
        raise InputError(f"embedding.model: unknown built-in embedder {section.model!r}; available: "
                         f"{', '.join(BUILTINS)}")
    return f"builtin:{section.model}"


def _weights_tag(pretrained: str | None) -> str:
    if pretrained and Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        return f"{path.name}@{file_sha256(path)[:12]}"
    return pretrained or "none"


def _torchscript(path: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...], device: str,
                 model_id: str) -> Embedder:
    from torchvision import transforms

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # SSCD and friends ship as TorchScript
            module = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"embedding.model: {path} is not a TorchScript file ({first}); save one with "
                         "torch.jit.script(model).save(path)") from None
    preprocess = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    with torch.inference_mode():
        dim = int(module(torch.zeros(1, 3, size, size, device=device)).reshape(1, -1).shape[1])
    return Embedder(model_id, dim, device, preprocess, module)


def _open_clip(section: EmbeddingSection, device: str, model_id: str) -> Embedder:
    import open_clip

    pretrained = section.pretrained
    if pretrained and Path(pretrained).expanduser().is_file():
        weights = Path(pretrained).expanduser()
        if weights.suffix in PICKLE_SUFFIXES and not section.allow_pickle:
            raise InputError(f"embedding.pretrained: {weights} is a pickle-based file, which can run code when "
                             "loaded; convert it to .safetensors or set embedding.allow_pickle: true")
        pretrained = str(weights)
    if section.model.startswith("local-dir:"):
        folder = Path(section.model.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise InputError(f"embedding.model: {folder} has no open_clip_config.json; a local-dir: open_clip "
                             "model is a folder with open_clip_config.json and weights")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            section.model, pretrained=pretrained, device=device)
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"embedding: cannot load open_clip model {section.model!r} "
                         f"(pretrained={section.pretrained!r}): {first}") from None
    model.eval()
    dim = int(getattr(model.visual, "output_dim", 0)) or _probe_dim(model, preprocess, device)
    return Embedder(model_id, dim, device, preprocess, model.encode_image)


def _probe_dim(model: Any, preprocess: Callable[[Image.Image], torch.Tensor], device: str) -> int:
    with torch.inference_mode():
        pixels = preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(device)
        return int(model.encode_image(pixels).shape[-1])


def _builtin_testbed_copy(device: str) -> Embedder:
    from audit.testbed import descriptor
    from audit.files import cached_build

    path = cached_build("testbed-copy-v1.pt", descriptor.save_descriptor)
    return _torchscript(path, descriptor.SIZE, descriptor.MEAN, descriptor.STD, device, "builtin:testbed-copy")


BUILTINS: dict[str, Callable[[str], Embedder]] = {"testbed-copy": _builtin_testbed_copy}
