"""Helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red vintage car parked on a cobblestone street",
    "the logo of a coffee shop, flat vector art",
    "portrait of a woman with a pearl earring, oil painting",
    "a golden retriever puppy playing in the snow",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "an aerial view of a city at night",
    "a watercolor painting of a lighthouse on a cliff",
]


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """Write a YAML config from keyword sections (run=..., model=..., ...)."""
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path
