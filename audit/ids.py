"""Stable identifiers and seeds (docs/architecture.md, "Contracts").

A prompt's id is a hash of its normalised text, a sample's id is ``{prompt_id}-{sample_idx:05d}``,
and a sample's seed is derived from (run seed, prompt_id, sample_idx) alone. Nothing here depends
on batch position, worker or cluster shape, so a sample is reproducible anywhere and a resumed run
regenerates the same samples.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PROMPT_ID_HEX = 16
MAX_SAMPLES_PER_PROMPT = 100_000  # sample_idx is written with five digits
_WHITESPACE = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, ends stripped. Case is kept:
    text encoders such as T5 are case-sensitive."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def prompt_id(text: str) -> str:
    """Hex id of a prompt: the first 64 bits of SHA-256 of its normalised UTF-8 text."""
    digest = hashlib.sha256(normalize_prompt(text).encode("utf-8")).hexdigest()
    return digest[:PROMPT_ID_HEX]


def sample_id(prompt_hash: str, sample_idx: int) -> str:
    """Id of the ``sample_idx``-th sample of a prompt; sorts in sample order within a prompt."""
    if not 0 <= sample_idx < MAX_SAMPLES_PER_PROMPT:
        raise ValueError(f"sample_idx {sample_idx} outside [0, {MAX_SAMPLES_PER_PROMPT})")
    return f"{prompt_hash}-{sample_idx:05d}"


def sample_id_array(prompt_ids: pa.Array, sample_idx: np.ndarray) -> pa.Array:
    """:func:`sample_id` of each (prompt id, sample index) pair, as one Arrow array built by
    string kernels (no Python object per sample)."""
    return pc.binary_join_element_wise(prompt_ids, _index_digits(sample_idx), "-")


def sample_range_ids(prompt_ids: pa.Array, first: int, end: int) -> pa.Array:
    """The ids of samples ``first`` … ``end - 1`` of each prompt, prompt by prompt (a shard's
    planned samples), as :func:`sample_id_array`; the index digits are built once per shape."""
    rows, digits = _range_layout(len(prompt_ids), first, end)
    return pc.binary_join_element_wise(prompt_ids.take(rows), digits, "-")


@lru_cache(maxsize=64)
def _range_layout(n_prompts: int, first: int, end: int) -> tuple[pa.Array, pa.Array]:
    """Which prompt each of a range's samples belongs to, and its index digits."""
    count = max(end - first, 0)
    return (pa.array(np.repeat(np.arange(n_prompts), count)),
            _index_digits(np.tile(np.arange(first, first + count), n_prompts)))


def _index_digits(sample_idx: np.ndarray) -> pa.Array:
    if len(sample_idx) and not (0 <= int(sample_idx.min()) and int(sample_idx.max()) < MAX_SAMPLES_PER_PROMPT):
        raise ValueError(f"sample_idx outside [0, {MAX_SAMPLES_PER_PROMPT})")
    return pc.utf8_lpad(pc.cast(pa.array(sample_idx), pa.string()), width=5, padding="0")


def sample_seed(run_seed: int, prompt_hash: str, sample_idx: int) -> int:
    """Seed of one sample, a non-negative 63-bit integer (fits int64 columns and
    ``torch.Generator.manual_seed``)."""
    material = f"memaudit-sample-seed:{run_seed}:{prompt_hash}:{sample_idx}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") >> 1


def shard_name(index: int, n_shards: int) -> str:
    """Zero-padded shard name (``shard-00042``); at least five digits, more when needed."""
    width = max(5, len(str(max(n_shards - 1, 0))))
    return f"shard-{index:0{width}d}"
