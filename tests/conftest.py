"""Shared fixtures: a tiny real checkpoint on disk, prompt files, one local Ray per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import PROMPTS

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built-in checkpoints go to a per-session cache, never to the user's home."""
    cache = tmp_path_factory.mktemp("memaudit-cache")
    old = os.environ.get("MEMAUDIT_CACHE")
    os.environ["MEMAUDIT_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations checks PyPI
    yield cache
    if old is None:
        os.environ.pop("MEMAUDIT_CACHE", None)
    else:
        os.environ["MEMAUDIT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny StableDiffusionPipeline, saved with save_pretrained (safetensors)."""
    from audit.testbed.architectures import TINY, build_pipeline, save_pipeline

    return save_pipeline(build_pipeline(TINY, seed=0), tmp_path_factory.mktemp("ckpt") / "tiny-sd")


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    """One local Ray per test module, bound to 127.0.0.1, no dashboard."""
    import ray

    from audit.pipeline import connect

    connect(None, num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
