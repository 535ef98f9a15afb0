"""Prompt sources (txt, JSONL, Parquet with LAION columns) and deterministic shard planning."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit import ids
from audit.config import PromptsSection
from audit.errors import InputError
from audit.plan import plan_prompts, shard_samples
from audit.prompts import read_prompts


def _section(path: Path, **kw: object) -> PromptsSection:
    return PromptsSection(source=str(path), **kw)


def test_txt_one_prompt_per_line_blank_skipped(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\r\n\n   \na dog\n".encode())
    raw = read_prompts(_section(path))
    assert raw.prompts == ["a cat", "a dog"]
    assert raw.source_rows == [1, 4]
    assert raw.skipped_blank == 2


def test_jsonl_with_laion_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"caption": "a cat", "key": "000001", "url": "http://x/1.jpg"}, {"caption": "a dog", "key": "000002"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    raw = read_prompts(_section(path))
    assert raw.prompts == ["a cat", "a dog"]
    assert raw.carried == {"key": ["000001", "000002"], "url": ["http://x/1.jpg", None]}


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "ok"}\n{"caption": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"p\.jsonl:2: malformed JSON"):
        read_prompts(_section(path))
    path.write_text('{"caption": "ok"}\n{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"p\.jsonl:2: no 'caption' field \(fields: text\); set prompts.text_column"):
        read_prompts(_section(path))
    with pytest.raises(InputError, match=r"p\.jsonl:1: no 'text' field \(fields: caption\)"):
        read_prompts(_section(path, text_column="text"))


def test_parquet_laion_metadata_folder(tmp_path: Path) -> None:
    folder = tmp_path / "metadata"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({
            "caption": [f"caption {i}-0", None, f"caption {i}-1"],
            "key": [f"{i}00", f"{i}01", f"{i}02"],
            "url": ["u0", "u1", "u2"],
            "similarity": [0.3, 0.2, 0.4],
        }), folder / f"metadata_{i}.parquet")
    raw = read_prompts(_section(folder))
    assert raw.prompts == ["caption 0-0", "caption 0-1", "caption 1-0", "caption 1-1"]
    assert raw.carried["key"] == ["000", "002", "100", "102"]
    assert raw.skipped_blank == 2
    with pytest.raises(InputError, match=r"no column 'text' \(columns: caption, key, url, similarity\)"):
        read_prompts(_section(folder, text_column="text"))


def test_missing_empty_and_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(_section(tmp_path / "none.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="contains no prompts"):
        read_prompts(_section(empty))
    odd = tmp_path / "p.csv"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="set prompts.format"):
        read_prompts(_section(odd))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(InputError, match=r"bad\.txt:2: not valid UTF-8"):
        read_prompts(_section(bad))
    with pytest.raises(InputError, match="unknown built-in prompt set"):
        read_prompts(PromptsSection(source="builtin:nope"))


def test_plan_dedupes_counts_and_shards(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a\nb\n a \nc\nd\ne\nb\n", encoding="utf-8")
    plan = plan_prompts(read_prompts(_section(path)), prompts_per_shard=2)
    assert plan.table.column("prompt").to_pylist() == ["a", "b", "c", "d", "e"]
    assert plan.table.column("n_occurrences").to_pylist() == [2, 2, 1, 1, 1]
    assert plan.table.column("shard").to_pylist() == [0, 0, 1, 1, 2]
    assert plan.table.column("source_row").to_pylist() == [1, 2, 4, 5, 6]
    assert plan.duplicates == 2 and plan.n_shards == 3
    shards = plan.shards()
    assert [s.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert shards[2].prompts == ("e",)
    limited = plan_prompts(read_prompts(_section(path)), prompts_per_shard=2, limit=3)
    assert limited.table.column("prompt").to_pylist() == ["a", "b", "c"]
    assert limited.sha256 != plan.sha256


def test_shard_samples_every_id_once_with_derived_seeds(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(7)), encoding="utf-8")
    plan = plan_prompts(read_prompts(_section(path)), prompts_per_shard=3)
    all_ids = []
    for shard in plan.shards():
        rows = shard_samples(shard, samples_per_prompt=5, run_seed=11)
        all_ids += list(rows["sample_id"])
        for pid, idx, seed in zip(rows["prompt_id"], rows["sample_idx"], rows["seed"]):
            assert seed == ids.sample_seed(11, pid, int(idx))
    assert len(all_ids) == len(set(all_ids)) == 35


def test_prompts_longer_than_the_text_encoder_reads_are_counted(tiny_checkpoint: Path) -> None:
    from audit.generate.tokens import truncated_prompts

    long_prompt = " ".join(["a very long caption about a lighthouse"] * 400)  # ~15k characters
    found = truncated_prompts(tiny_checkpoint, ["p1", "p2", "p3"], ["a cat", long_prompt, "a dog " * 50])
    assert found["max_tokens"] == 77 and found["count"] == 2 and found["examples"] == ["p2", "p3"]
    assert found["longest"] > 2000
    assert truncated_prompts(tiny_checkpoint / "unet", ["p"], ["x"]) == {}  # no tokenizer: nothing to say
