"""Ids and seeds depend only on text, run seed and sample index (docs/architecture.md, "Contracts")."""

from __future__ import annotations

import hashlib

import pytest

from audit import ids


def test_prompt_id_is_stable_and_normalised() -> None:
    pid = ids.prompt_id("a photo of a cat")
    assert pid == ids.prompt_id("  a photo\tof   a cat\n")
    assert pid == ids.prompt_id("a photo of a cat")
    assert len(pid) == 16 and int(pid, 16) >= 0
    assert pid != ids.prompt_id("A photo of a cat")  # case is kept (T5 encoders are case-sensitive)
    # NFC: a precomposed é and e + combining accent are the same prompt
    assert ids.prompt_id("caf\u00e9") == ids.prompt_id("cafe\u0301")


def test_prompt_id_is_the_documented_hash() -> None:
    # A change to the hashing would orphan every existing run: pin it to its definition.
    expected = hashlib.sha256("a café  photo".replace("  ", " ").encode()).hexdigest()[:16]
    assert ids.prompt_id(" a café \n photo ") == expected


def test_sample_id_format_and_bounds() -> None:
    assert ids.sample_id("abc", 7) == "abc-00007"
    assert ids.sample_id("abc", 99_999) == "abc-99999"
    with pytest.raises(ValueError):
        ids.sample_id("abc", 100_000)
    with pytest.raises(ValueError):
        ids.sample_id("abc", -1)


def test_seed_depends_on_run_seed_prompt_and_index_only() -> None:
    pid = ids.prompt_id("x")
    seeds = {ids.sample_seed(0, pid, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert ids.sample_seed(0, pid, 3) == ids.sample_seed(0, pid, 3)
    assert ids.sample_seed(1, pid, 3) != ids.sample_seed(0, pid, 3)
    assert ids.sample_seed(0, ids.prompt_id("y"), 3) != ids.sample_seed(0, pid, 3)
    assert all(0 <= s < 2**63 for s in seeds)


def test_shard_names_are_zero_padded_and_sort() -> None:
    assert ids.shard_name(3, 10) == "shard-00003"
    assert ids.shard_name(123_456, 200_000) == "shard-123456"
    names = [ids.shard_name(i, 200_000) for i in (2, 10, 100_000)]
    assert names == sorted(names)
