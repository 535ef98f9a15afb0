"""Embedding folders, faiss index shards, search and duplicate counts on synthetic vectors."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.config import ReferenceSection, load_config
from audit.errors import InputError
from audit.reference.dups import count_duplicates, write_dups
from audit.reference.folder import validate_folder
from audit.reference.index import build_index, choose_factory
from audit.reference.search import ReferenceIndex, merge_topk


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_folder(root: Path, parts: list[np.ndarray], padded: bool = False, model_id: str | None = "synthetic") -> Path:
    """A LAION-layout folder: img_emb_{i}.npy (float16) + metadata_{i}.parquet per part."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    row = 0
    for i, part in enumerate(parts):
        name = f"{i:04d}" if padded else str(i)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", part.astype(np.float16))
        keys = [f"k{row + j:06d}" for j in range(len(part))]
        pq.write_table(pa.table({"key": keys, "caption": [f"caption {k}" for k in keys],
                                 "url": [f"http://x/{k}" for k in keys]}), root / "metadata" / f"metadata_{name}.parquet")
        row += len(part)
    if model_id:
        (root / "embedding.json").write_text(json.dumps({"model_id": model_id, "dim": parts[0].shape[1]}))
    return root


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    b = unit(base.astype(np.float16).astype(np.float32))
    return np.argsort(-(unit(queries) @ b.T), axis=1, kind="stable")[:, :k]


def test_exact_index_over_three_shards_equals_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [unit(rng.standard_normal((n, 32))) for n in (700, 500, 300)]
    root = write_folder(tmp_path / "ref", parts)
    manifest = build_index(root, ReferenceSection(vectors_per_shard=600))
    assert manifest["factory"] == "Flat" and manifest["exact"] and len(manifest["shards"]) == 3
    assert [s["rows"] for s in manifest["shards"]] == [[0, 600], [600, 1200], [1200, 1500]]
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    scores, rows = ReferenceIndex(root).search(queries, 10, model_id="synthetic")
    assert np.array_equal(rows, brute_force(np.concatenate(parts), queries, 10))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.slow
def test_ivf_pq_with_exact_rerank_reaches_recall_on_clustered_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 64)) * 3
    base = unit(centres[rng.integers(0, 50, 10_000)] + rng.standard_normal((10_000, 64)))
    root = write_folder(tmp_path / "ref", [base[:6_000], base[6_000:]])
    section = ReferenceSection(index_factory="IVF64,PQ16x8", train_sample=3000, nprobe=16, rerank=20)
    manifest = build_index(root, section)
    assert not manifest["exact"] and manifest["shards"][0]["trained_on"] == 3000
    queries = unit(centres[rng.integers(0, 50, 300)] + rng.standard_normal((300, 64))).astype(np.float32)
    truth = brute_force(base, queries, 10)
    recall = {}
    for rerank in (1, 20):
        _, rows = ReferenceIndex(root, rerank=rerank).search(queries, 10)
        recall[rerank] = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert recall[20] >= 0.95, recall
    assert recall[20] > recall[1], recall  # PQ alone loses recall; exact re-ranking restores it


def test_training_is_done_once_and_shared_by_every_shard(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base = unit(rng.standard_normal((3000, 32)))
    root = write_folder(tmp_path / "ref", [base])
    section = ReferenceSection(flat_max_vectors=1, vectors_per_shard=1000, train_sample=2000, nprobe=4)
    manifest = build_index(root, section)
    assert manifest["factory"] == "IVF256,SQ8" and len(manifest["shards"]) == 3
    trained = json.loads((root / "index" / "trained.json").read_text())
    assert trained["trained_on"] == 2000 and all(s["trained_on"] == 2000 for s in manifest["shards"])
    shards = [faiss.read_index(str(root / "index" / s["file"])) for s in manifest["shards"]]
    centroids = [faiss.extract_index_ivf(s).quantizer.reconstruct_n(0, 256) for s in shards]
    assert all(np.array_equal(centroids[0], c) for c in centroids[1:])  # one coarse quantizer for all
    stamp = (root / "index" / "trained.faiss").stat().st_mtime_ns
    (root / "index" / "shard_1.json").unlink()  # one shard lost: rebuilt from the saved training
    again = build_index(root, section)
    assert (root / "index" / "trained.faiss").stat().st_mtime_ns == stamp
    assert [s["file"] for s in again["shards"]] == [s["file"] for s in manifest["shards"]]
    _, rows = ReferenceIndex(root).search(base[:50].astype(np.float32), 1)
    assert np.array_equal(rows[:, 0], np.arange(50))  # a vector finds itself through the shared training


def test_default_recipe_is_exact_when_small_and_ivf_sq8_when_large() -> None:
    section = ReferenceSection()
    assert choose_factory(10_000, 768, section) == "Flat"
    assert choose_factory(5_000_000, 768, section) == "IVF8192,SQ8"
    assert choose_factory(10, 768, ReferenceSection(index_factory="HNSW32")) == "HNSW32"


def test_bad_rows_are_excluded_with_reasons_and_never_returned(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    part = unit(rng.standard_normal((100, 16)))
    part[3] = np.nan
    part[7, 2] = np.inf
    part[11] = 0
    part[20] *= 3  # not unit length: counted and re-normalised
    root = write_folder(tmp_path / "ref", [part])
    check = validate_folder(root)
    assert {r: why.split(":")[0] for (_, r), why in check.excluded.items()} == {3: "nan", 7: "inf", 11: "zero"}
    assert check.renormalised_rows == 1
    manifest = build_index(root, ReferenceSection())
    assert manifest["count"] == 97 and manifest["excluded"] == 3
    excluded = pq.read_table(root / "index" / "excluded.parquet").to_pydict()
    assert excluded["global_row"] == [3, 7, 11] and all(excluded["reason"])
    _, rows = ReferenceIndex(root).search(part[[20, 21]].astype(np.float32), 100)
    assert not set(rows.ravel()) & {3, 7, 11}
    assert rows[0, 0] == 20  # the re-normalised row is its own best match


@pytest.mark.parametrize("problem, message", [
    ("dims", "dimension 8 differs from 16"),
    ("rows", "has 10 rows but .* has 9"),
    ("dtype", "dtype int32 is not supported"),
    ("no_meta", "no matching metadata/metadata_1.parquet"),
])
def test_structural_problems_are_clear_errors(tmp_path: Path, problem: str, message: str) -> None:
    rng = np.random.default_rng(3)
    root = write_folder(tmp_path / "ref", [unit(rng.standard_normal((10, 16))), unit(rng.standard_normal((10, 16)))])
    if problem == "dims":
        np.save(root / "img_emb" / "img_emb_1.npy", unit(rng.standard_normal((10, 8))).astype(np.float16))
    elif problem == "rows":
        pq.write_table(pq.read_table(root / "metadata" / "metadata_1.parquet").slice(0, 9),
                       root / "metadata" / "metadata_1.parquet")
    elif problem == "dtype":
        np.save(root / "img_emb" / "img_emb_1.npy", np.ones((10, 16), np.int32))
    else:
        (root / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(InputError, match=message):
        build_index(root, ReferenceSection())


def test_duplicate_keys_are_counted_in_the_manifest_and_rows_stay_apart(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    parts = [unit(rng.standard_normal((10, 16))), unit(rng.standard_normal((10, 16)))]
    root = write_folder(tmp_path / "ref", parts)
    meta = pq.read_table(root / "metadata" / "metadata_1.parquet").to_pydict()
    meta["key"][:3] = ["k000000", "k000001", "k000000"]  # two keys of file 0, one of them twice
    pq.write_table(pa.table(meta), root / "metadata" / "metadata_1.parquet")
    manifest = build_index(root, ReferenceSection())
    assert manifest["duplicate_keys"] == 3 and manifest["count"] == 20
    _, rows = ReferenceIndex(root).search(parts[1][[0]].astype(np.float32), 2)
    assert rows[0, 0] == 10  # matched by row, not by its (ambiguous) key


def test_laion_zero_padded_names_are_read_as_they_are(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    root = write_folder(tmp_path / "laion", [unit(rng.standard_normal((30, 16))) for _ in range(3)],
                        padded=True, model_id=None)
    manifest = build_index(root, ReferenceSection())
    assert [f["npy"] for f in manifest["files"]] == [f"img_emb/img_emb_{i:04d}.npy" for i in range(3)]
    assert manifest["count"] == 90 and manifest["embedding"]["model_id"] is None


def test_queries_from_another_model_or_dimension_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    root = write_folder(tmp_path / "ref", [unit(rng.standard_normal((20, 16)))])
    build_index(root, ReferenceSection())
    index = ReferenceIndex(root)
    with pytest.raises(InputError, match="embedded with open_clip:ViT-B-32.*synthetic"):
        index.search(np.ones((2, 16), np.float32), 5, model_id="open_clip:ViT-B-32:openai")
    with pytest.raises(InputError, match="dim 16"):
        index.search(np.ones((2, 8), np.float32), 5, model_id="synthetic")


def test_merge_topk_does_not_depend_on_shard_order() -> None:
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[4, 8]]))
    b = (np.array([[0.7, 0.5]], np.float32), np.array([[2, 1]]))
    c = (np.array([[0.95, -np.inf]], np.float32), np.array([[9, -1]]))
    first = merge_topk([a, b, c], 4)
    second = merge_topk([c, b, a], 4)
    assert np.array_equal(first[1], second[1]) and np.array_equal(first[1], [[9, 4, 2, 1]])
    scores, rows = merge_topk([c], 3)
    assert rows.tolist() == [[9, -1, -1]] and scores[0, 1] == -np.inf


def planted(rng: np.random.Generator, groups: dict[int, int], n_single: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with planted near-duplicate groups; returns (vectors, expected dup counts)."""
    rows, expected = [], []
    for size, count in groups.items():
        for _ in range(count):
            centre = rng.standard_normal(dim)
            rows += [centre + 0.01 * rng.standard_normal(dim) for _ in range(size)]
            expected += [size - 1] * size
    rows += list(rng.standard_normal((n_single, dim)))
    expected += [0] * n_single
    order = rng.permutation(len(rows))
    return unit(np.array(rows))[order], np.array(expected)[order]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x4"])
def test_duplicate_counts_are_right_on_planted_groups(tmp_path: Path, factory: str) -> None:
    vectors, expected = planted(np.random.default_rng(6), {6: 3, 3: 5, 2: 10}, 400)
    root = write_folder(tmp_path / "ref", [vectors[:300], vectors[300:]])
    build_index(root, ReferenceSection(index_factory=factory, vectors_per_shard=250, train_sample=250, nprobe=16))
    counts = count_duplicates(ReferenceIndex(root), threshold=0.95)
    assert np.array_equal(np.concatenate([counts[0], counts[1]]), expected)


def test_most_duplicated_captions_become_the_prompts(tmp_path: Path) -> None:
    from audit.prompts import read_prompts
    from audit.plan import plan_prompts

    vectors, expected = planted(np.random.default_rng(7), {5: 1, 3: 1}, 50)
    root = write_folder(tmp_path / "ref", [vectors])
    build_index(root, ReferenceSection())
    histogram = write_dups(root, ReferenceIndex(root), 0.95)
    assert histogram == {"4": 5, "2": 3, "0": 50}
    cfg = load_config(None, ["prompts.source=" + str(root), "prompts.format=most_duplicated", "prompts.limit=6"])
    plan = plan_prompts(read_prompts(cfg.prompts), 4, cfg.prompts.limit)
    assert plan.n_prompts == 6
    top = [int(key.removeprefix("k")) for key in plan.table.column("key").to_pylist()]
    assert expected[top].tolist() == [4, 4, 4, 4, 4, 2]  # most duplicated first
    assert plan.table.column("prompt").to_pylist()[0] == f"caption k{top[0]:06d}"
