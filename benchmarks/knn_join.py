"""The distributed kNN join vs single-process exact search, at equal recall.

Clustered synthetic unit vectors (as in benchmarks/reference.py) form the reference set, indexed
with the default large-index recipe (IVF-PQ + exact re-ranking) in S shards; the same queries
are answered by (a) one exact faiss IndexFlatIP over all vectors in this process and (b) the join
of `memaudit run`: one Ray actor per index shard, query batches fanned out, top-k merged. Prints
queries/s of both, their ratio, recall@10 of the join against the exact answer, the per-shard
efficiency when the shard count doubles, and each shard actor's peak memory against its index
file size.

    python benchmarks/knn_join.py                                  # 1M x 768, 100k queries (target)
    python benchmarks/knn_join.py --vectors 100000 --queries 10000 # scaled down for 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import ray

from reference import clustered, write_folder


def exact(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index = faiss.IndexFlatIP(base.shape[1])
    for start in range(0, len(base), 200_000):
        index.add(base[start : start + 200_000].astype(np.float32))
    began = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, time.perf_counter() - began


def join(root: Path, index_dir: Path, manifest: dict, queries: np.ndarray, k: int, batch: int, nprobe: int,
         rerank: int) -> tuple[np.ndarray, float, list[int]]:
    from audit.pipeline.detection import IndexShardActor, _fan_out

    shards = [s["shard"] for s in manifest["shards"]]
    args = [(str(root), [s], nprobe, rerank, str(index_dir)) for s in shards]
    actors = [IndexShardActor.options(num_cpus=0.01).remote(*a) for a in args]
    ray.get([a.peak_rss_bytes.remote() for a in actors])  # loaded
    began = time.perf_counter()
    rows = np.concatenate([_fan_out(actors, args, queries[i : i + batch], k, 3)[1]
                           for i in range(0, len(queries), batch)])
    seconds = time.perf_counter() - began
    peaks = ray.get([a.peak_rss_bytes.remote() for a in actors])
    for actor in actors:
        ray.kill(actor)
    return rows, seconds, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--rerank", type=int, default=20)
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from audit.config import ReferenceSection
    from audit.pipeline.ray_setup import connect
    from audit.reference.index import build_index

    data = clustered(args.vectors + args.queries, args.dim, args.clusters, seed=0)
    base, queries = data[: args.vectors], data[args.vectors :].astype(np.float32)
    truth, exact_s = exact(base, queries, 10)
    results: dict[str, object] = {"exact_queries_per_s": args.queries / exact_s}
    connect(None)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp) / "ref", base, per_file=250_000)
        for shards in (args.shards, 2 * args.shards):
            index_dir = Path(tmp) / "ref" / f"index{shards}"
            section = ReferenceSection(flat_max_vectors=1, vectors_per_shard=-(-args.vectors // shards),
                                       train_sample=args.train_sample, nprobe=args.nprobe, rerank=args.rerank)
            manifest = build_index(Path(tmp) / "ref", section, index_dir)
            rows, seconds, peaks = join(Path(tmp) / "ref", index_dir, manifest, queries, 10, args.batch,
                                        args.nprobe, args.rerank)
            recall = float(np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)]))
            sizes = [(index_dir / s["file"]).stat().st_size for s in manifest["shards"]]
            results[f"shards={shards}"] = {
                "queries_per_s": args.queries / seconds, "recall@10": recall, "factory": manifest["factory"],
                "speedup_vs_exact": (args.queries / seconds) / (args.queries / exact_s),
                "peak_rss_mb": [p / 2**20 for p in peaks], "index_file_mb": [b / 2**20 for b in sizes],
            }
    ray.shutdown()
    print(f"reference {args.vectors} x {args.dim} (clustered), {args.queries} queries, k=10")
    print(f"exact IndexFlatIP, one process: {results['exact_queries_per_s']:.0f} queries/s")
    for shards in (args.shards, 2 * args.shards):
        r = results[f"shards={shards}"]
        print(f"join, {shards} shard actors ({r['factory']}, nprobe {args.nprobe}, re-rank 10x{args.rerank}): "
              f"{r['queries_per_s']:.0f} queries/s = {r['speedup_vs_exact']:.1f}x exact, recall@10 {r['recall@10']:.3f}; "
              f"peak RSS per actor {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} MB for index files of "
              f"{', '.join(f'{m:.0f}' for m in r['index_file_mb'])} MB")
    a, b = results[f"shards={args.shards}"], results[f"shards={2 * args.shards}"]
    print(f"doubling shards: throughput x{b['queries_per_s'] / a['queries_per_s']:.2f} "
          f"(on the same cores: 1.0 means no loss from the extra fan-out)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
