"""Streaming planning (audit/plan.py, docs/architecture.md "Scale") against its definition: the
plan a prompt-by-prompt de-duplication makes (first occurrence wins, occurrences counted, ids of
normalised text), with chunks small enough that every chunk boundary is crossed."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit import ids, plan, prompts, schema
from audit.config import PromptsSection
from audit.errors import InputError
from audit.plan import PromptPlan, ShardSpec, keep_prompts, plan_prompts
from audit.prompts import RawPrompts, read_prompts

# whitespace variants (ASCII and Unicode), composed and decomposed accents, blank lines
LINES = [
    "a cat", "  a  cat ", "a\tcat\x0b", "\x1ca cat\x1f", "a\u00a0cat", "a\u3000cat", "a\u2000cat\u2028",
    "", "   ", "\u3000", "\t",
    "café au lait", "cafe\u0301 au lait", "cafe\u0301  au\tlait ",
    "\u212b ring", "\u00c5 ring", "A\u030a ring",
    "東京の 写真", "東京の  写真", "a dog", "a cat", "x" * 300, " " + "x" * 300,
    *[f"prompt {i % 11} of {i % 3}" for i in range(40)],
]


def reference_plan(raw: RawPrompts, per_shard: int, prompt_id=ids.prompt_id, limit: int | None = None) -> PromptPlan:
    """The plan as defined: one prompt at a time, Python dicts."""
    first: dict[str, int] = {}
    texts: dict[str, str] = {}
    counts: dict[str, int] = {}
    for position, text in enumerate(raw.prompts):
        normalized = ids.normalize_prompt(text)
        found = prompt_id(normalized)
        if found in first:
            if texts[found] != normalized:
                raise InputError(f"{raw.source}: prompts {texts[found]!r} and {normalized!r} share id {found} "
                                 "(hash collision); remove one of them")
            counts[found] += 1
            continue
        first[found], texts[found], counts[found] = position, normalized, 1
    chosen = list(first)[:limit] if limit else list(first)
    positions = [first[f] for f in chosen]
    carried = raw.carried
    columns = {
        "prompt_id": chosen, "prompt": [texts[f] for f in chosen], "shard": [i // per_shard for i in range(len(chosen))],
        "source_row": [raw.source_rows[p] for p in positions], "n_occurrences": [counts[f] for f in chosen],
        **{c: ([carried[c][p] for p in positions] if carried.get(c) else [None] * len(chosen)) for c in ("key", "url")},
    }
    return PromptPlan(pa.Table.from_pydict(columns, schema=schema.PROMPTS), per_shard,
                      len(raw.prompts) - len(first), raw.skipped_blank)


def _fields(shards) -> list[tuple]:
    return [(s.index, s.name, tuple(s.prompt_ids), tuple(s.prompts), s.first_sample, s.end_sample) for s in shards]


def _sources(tmp_path: Path) -> list[Path]:
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"caption": t, "key": i, "url": None if i % 4 else f"u{i}"})
                               for i, t in enumerate(LINES)), encoding="utf-8")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": [None if i % 9 == 4 else t for i, t in enumerate(LINES)],
                             "key": [f"k{i}" for i in range(len(LINES))],
                             "url": [None if i % 4 else f"u{i}" for i in range(len(LINES))]}), parquet, row_group_size=7)
    return [txt, jsonl, parquet]


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 rows while reading and hashing, plan batches (row groups) of 4: every boundary
    is crossed."""
    monkeypatch.setattr(prompts, "CHUNK_ROWS", 3)
    monkeypatch.setattr(plan, "CHUNK_ROWS", 3)
    monkeypatch.setattr(plan, "ROW_GROUP_ROWS", 4)


@pytest.mark.usefixtures("tiny_chunks")
@pytest.mark.parametrize("per_shard", [1, 4, 5, 1000])
def test_plan_is_the_prompt_by_prompt_plan(tmp_path: Path, per_shard: int) -> None:
    for source in _sources(tmp_path):
        raw = read_prompts(PromptsSection(source=str(source)))
        assert raw.table.column("prompt").num_chunks > 1
        for limit in (None, 3):
            want, got = reference_plan(raw, per_shard, limit=limit), plan_prompts(raw, per_shard, limit)
            assert got.table.equals(want.table), source.name
            assert got.table.schema == schema.PROMPTS
            assert (got.duplicates, got.skipped_blank, got.n_shards) == (want.duplicates, want.skipped_blank, want.n_shards)
            assert got.sha256 == want.sha256 == hashlib.sha256("\n".join(want.table["prompt_id"].to_pylist()).encode()).hexdigest()
            assert _fields(got.shards()) == _fields(want.shards())
            pq.write_table(got.table, tmp_path / "got.parquet", row_group_size=4)
            pq.write_table(want.table, tmp_path / "want.parquet", row_group_size=4)
            assert (tmp_path / "got.parquet").read_bytes() == (tmp_path / "want.parquet").read_bytes()
    assert want.duplicates > 10 and want.skipped_blank >= 4


def test_plan_batches_are_the_row_groups_pyarrow_writes_by_default(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": np.zeros(plan.ROW_GROUP_ROWS + 1, np.int8)}), tmp_path / "x.parquet")
    assert pq.ParquetFile(tmp_path / "x.parquet").metadata.row_group(0).num_rows == plan.ROW_GROUP_ROWS


def test_counts_of_the_example(tmp_path: Path) -> None:
    raw = read_prompts(PromptsSection(source=str(_sources(tmp_path)[0])))
    got = plan_prompts(raw, 4)
    assert raw.skipped_blank == 4  # "", "   ", ideographic space, tab
    assert got.table["prompt"].to_pylist()[:7] == ["a cat", "café au lait", "\u00c5 ring", "東京の 写真", "a dog",
                                                   "x" * 300, "prompt 0 of 0"]
    assert got.table["n_occurrences"].to_pylist()[:6] == [8, 3, 3, 2, 1, 2]
    assert got.table["source_row"].to_pylist()[:4] == [1, 12, 15, 18]


@pytest.mark.usefixtures("tiny_chunks")
def test_shards_are_views_that_pickle_as_tuples_and_keep_prompts_filters_them(tmp_path: Path) -> None:
    raw = read_prompts(PromptsSection(source=str(_sources(tmp_path)[2])))
    want, got = reference_plan(raw, 3), plan_prompts(raw, 3)
    shards = got.shards()
    assert len(shards) == got.n_shards and shards[-1] == want.shards()[-1] and shards[1:3] == want.shards()[1:3]
    with pytest.raises(IndexError):
        shards[len(shards)]
    sent = pickle.loads(pickle.dumps(shards[2]))
    assert type(sent.prompt_ids) is tuple and type(sent.prompts) is tuple and sent == shards[2]
    assert shards[2].prompt_ids[-1] == sent.prompt_ids[-1] and shards[2].prompts[:2] == sent.prompts[:2]
    keep = set(want.table["prompt_id"].to_pylist()[1::3])
    for values in (keep, pa.array(sorted(keep))):
        kept = keep_prompts(shards, values, 1, 4, 8)
        assert _fields(kept) == [
            (s.index, f"{s.name}-r1", tuple(p for p in s.prompt_ids if p in keep),
             tuple(t for p, t in zip(s.prompt_ids, s.prompts) if p in keep), 4, 8)
            for s in want.shards() if any(p in keep for p in s.prompt_ids)]
        fewer = set(sorted(keep)[::2])
        again = keep_prompts(kept, fewer, 2, 8, 16)
        assert _fields(again) == [(s.index, f"{s.name}-r1-r2", *((tuple(v) for v in _only(s, fewer))), 8, 16)
                                  for s in want.shards() if any(p in fewer for p in s.prompt_ids)]
    tuples = [ShardSpec(0, "a", ("x", "y"), ("X", "Y")), ShardSpec(1, "b", (), ()), ShardSpec(2, "c", ("z",), ("Z",))]
    assert _fields(keep_prompts(tuples, {"y", "z"})) == [(0, "a", ("y",), ("Y",), 0, None), (2, "c", ("z",), ("Z",), 0, None)]
    assert keep_prompts(tuples, set()) == [] and keep_prompts([], {"x"}) == []


def _only(shard: ShardSpec, keep: set[str]) -> tuple[list[str], list[str]]:
    pairs = [(p, t) for p, t in zip(shard.prompt_ids, shard.prompts) if p in keep]
    return [p for p, _ in pairs], [t for _, t in pairs]


@pytest.mark.usefixtures("tiny_chunks")
def test_hash_collision_is_refused_naming_the_first_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = read_prompts(PromptsSection(source=str(_sources(tmp_path)[0])))

    def colliding_id(text: str) -> str:  # 4 ids for every prompt
        return f"{int(ids.prompt_id(text), 16) % 4:016x}"

    with pytest.raises(InputError) as wanted:
        reference_plan(raw, 4, prompt_id=colliding_id)
    real = plan.hash_prompts

    def colliding(texts: list[str]) -> tuple[np.ndarray, list[int], list[str]]:
        keys, changed, changed_texts = real(texts)
        return keys % np.uint64(4), changed, changed_texts

    monkeypatch.setattr(plan, "hash_prompts", colliding)
    with pytest.raises(InputError, match=re.escape(str(wanted.value))):
        plan_prompts(raw, 4)
    assert "hash collision" in str(wanted.value)


def test_ascii_shortcut_is_normalize_prompt_and_prompt_id() -> None:
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))) for _ in range(3000)]
    texts += ["a\u00a0b", "\u2000a\u3000 b\u2029", "cafe\u0301", "\u212b", "\u00e9 \u0301", " \u0301x", "x\u0085y"]
    keys, changed, changed_texts = plan.hash_prompts(texts)
    assert [f"{k:016x}" for k in keys.tolist()] == [ids.prompt_id(ids.normalize_prompt(t)) for t in texts]
    normalized = list(texts)
    for i, text in zip(changed, changed_texts):
        normalized[i] = text
    assert normalized == [ids.normalize_prompt(t) for t in texts]


def test_joined_sha256_over_chunks() -> None:
    values = pa.chunked_array([["a", "bb"], [], ["ccc"], ["d", "e", "f"]])
    expected = hashlib.sha256("a\nbb\nccc\nd\ne\nf".encode()).hexdigest()
    assert {plan.joined_sha256(values, step) for step in (1, 2, 4, 100)} == {expected}
    assert plan.joined_sha256(pa.chunked_array([], pa.string())) == hashlib.sha256(b"").hexdigest()
