"""Reference side: embedding images/s, index build time, bytes per vector, recall@10 vs exact.

Synthetic clustered unit vectors (``--clusters`` Gaussian clusters, like CLIP embeddings of a web
crawl) are written in the LAION layout, indexed with the default large-index recipe
(``IVF{nlist},PQ{dim/8}x8``, exact re-ranking of k x rerank candidates against the
memory-mapped float16 vectors), and searched with ``--queries`` held-out vectors; recall@10 is
measured against exact brute force, with and without re-ranking. The embedding rate is the
embedding stage (decode + preprocess + model) on PNG images, for the built-in testbed descriptor
and for open_clip ViT-B-32 (random weights: the same speed as pretrained ones).

    python benchmarks/reference.py                     # 1M x 768 (the target; needs ~12 GB, long on 2 cores)
    python benchmarks/reference.py --vectors 100000    # scaled down for a 2-core machine
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float16)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, dim)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_folder(root: Path, vectors: np.ndarray, per_file: int) -> None:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i, start in enumerate(range(0, len(vectors), per_file)):
        part = vectors[start : start + per_file]
        np.save(root / "img_emb" / f"img_emb_{i}.npy", part)
        pq.write_table(pa.table({"key": [f"{start + j:09d}" for j in range(len(part))]}),
                       root / "metadata" / f"metadata_{i}.parquet")


def exact_top10(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best_s = np.full((len(queries), 10), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 10), np.int64)
    for start in range(0, len(base), 200_000):
        sims = queries @ base[start : start + 200_000].astype(np.float32).T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def bench_index(args: argparse.Namespace, work: Path) -> dict[str, float | str]:
    from audit.config import ReferenceSection
    from audit.reference.index import build_index
    from audit.reference.search import ReferenceIndex

    data = clustered(args.vectors + args.queries, args.dim, args.clusters, seed=0)
    base, queries = data[: args.vectors], data[args.vectors :].astype(np.float32)
    write_folder(work / "ref", base, per_file=250_000)
    section = ReferenceSection(flat_max_vectors=1, vectors_per_shard=max(args.vectors, 1), rerank=args.rerank,
                               nprobe=args.nprobe, train_sample=args.train_sample)
    start = time.perf_counter()
    manifest = build_index(work / "ref", section)
    build_s = time.perf_counter() - start
    index_bytes = sum((work / "ref" / "index" / s["file"]).stat().st_size for s in manifest["shards"])
    truth = exact_top10(base, queries)
    result: dict[str, float | str] = {"factory": manifest["factory"], "build_s": build_s,
                                      "bytes_per_vector": index_bytes / manifest["count"],
                                      "raw_float16_bytes_per_vector": 2 * args.dim}
    for rerank in (1, args.rerank):
        index = ReferenceIndex(work / "ref", rerank=rerank)
        start = time.perf_counter()
        _, rows = index.search(queries, 10)
        seconds = time.perf_counter() - start
        recall = float(np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)]))
        result[f"recall@10_rerank{rerank}"] = recall
        result[f"queries_per_s_rerank{rerank}"] = len(queries) / seconds
    return result


def bench_embedding(args: argparse.Namespace) -> dict[str, float]:
    import io

    from PIL import Image

    from audit.config import EmbeddingSection
    from audit.embed.embedding import EmbedStage

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(args.images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    batch = {"image": np.array(pngs, dtype=object)}
    rates = {}
    for name, section in {
        "builtin:testbed-copy": EmbeddingSection(batch_size=64),
        "open_clip ViT-B-32": EmbeddingSection(kind="open_clip", model="ViT-B-32", batch_size=64),
    }.items():
        stage = EmbedStage(section)
        stage({"image": batch["image"][:2]})  # warm-up
        start = time.perf_counter()
        out = stage(batch)
        rates[name] = len(pngs) / (time.perf_counter() - start)
        assert (out["status"] == "ok").all()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--train-sample", type=int, default=200_000)
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--rerank", type=int, default=20)
    parser.add_argument("--images", type=int, default=256, help="images for the embedding rate")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_embedding:
        results["embedding_images_per_s"] = rates = bench_embedding(args)
        for name, rate in rates.items():
            print(f"embedding {name}: {rate:.1f} images/s ({args.image_size}px PNG, decode included)")
    with tempfile.TemporaryDirectory() as tmp:
        results["index"] = r = bench_index(args, Path(tmp))
    print(f"index {r['factory']} over {args.vectors} x {args.dim} clustered vectors: build {r['build_s']:.1f} s, "
          f"{r['bytes_per_vector']:.1f} bytes/vector in the index (+ the float16 vectors it re-ranks with, "
          f"{r['raw_float16_bytes_per_vector']} bytes, memory-mapped)")
    print(f"recall@10 vs exact: {r['recall@10_rerank1']:.3f} without re-ranking, "
          f"{r[f'recall@10_rerank{args.rerank}']:.3f} with exact re-ranking of 10x{args.rerank}; "
          f"{r[f'queries_per_s_rerank{args.rerank}']:.0f} queries/s (nprobe {args.nprobe})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
