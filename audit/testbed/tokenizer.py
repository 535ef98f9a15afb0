"""CLIP's BPE tokenizer, built offline.

open_clip ships the byte-pair merges CLIP was trained with. CLIP's vocabulary is a pure function
of them (256 byte symbols, the same with an end-of-word mark, one token per merge, then the start
and end tokens), so the tokenizer of every CLIP-based Stable Diffusion checkpoint can be rebuilt
here without a download, and it tokenizes exactly as open_clip's own tokenizer does.
"""

from __future__ import annotations

import gzip
from functools import lru_cache

N_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : N_MERGES + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77):  # -> transformers.CLIPTokenizer
    """A ``transformers.CLIPTokenizer`` equal to CLIP's (49408 tokens, 77 positions)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
