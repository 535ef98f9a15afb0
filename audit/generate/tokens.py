"""Prompts longer than the text encoder reads: CLIP text encoders see at most 77 tokens and the
pipeline silently drops the rest, so a long caption is audited as its first 77 tokens. The run
records how many prompts that affects (``run.json: prompts.truncated``) and warns."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
EXAMPLES = 5


def truncated_prompts(folder: Path, prompt_ids: list[str], prompts: list[str], batch: int = 4096) -> dict[str, Any]:
    """``{max_tokens, count, longest, examples}`` for the checkpoint's tokenizer; ``{}`` when the
    checkpoint has no ``tokenizer/`` folder (nothing to measure against)."""
    if not (folder / "tokenizer").is_dir():
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    limit = int(tokenizer.model_max_length)
    lengths: list[int] = []
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(list(prompts[start : start + batch]), truncation=False, add_special_tokens=True,
                            verbose=False)["input_ids"]
        lengths += [len(ids) for ids in encoded]
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over:
        log.warning("%d of %d prompts are longer than the text encoder's %d tokens and are truncated to them "
                    "(the longest has %d), e.g. prompt_id %s", len(over), len(prompts), limit,
                    max(lengths), prompt_ids[over[0]])
    return {"max_tokens": limit, "count": len(over), "longest": max(lengths, default=0),
            "examples": [prompt_ids[i] for i in over[:EXAMPLES]]}
