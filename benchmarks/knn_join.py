"""The distributed kNN join vs single-process exact search, at equal recall.

Clustered synthetic unit vectors (as in benchmarks/reference.py) form the reference set, indexed
with the default large-index recipe (IVF{nlist},SQ8 + exact re-ranking) in S and then 2S shards
(trained once, the training reused by the second build); the same queries are answered by (a)
one exact faiss IndexFlatIP over all vectors in this process, all cores, and (b) the join of
`memaudit run`: index-shard actors (one per shard, at most one per CPU, the CPUs split among
them), query batches fanned out to all at once, top-k merged. Prints queries/s of both, their
ratio, recall@10 of the join against the exact answer, the throughput change when the shard
count doubles on the same cores, and each shard actor's peak memory against its index files.
The exact search is timed on the first --exact-queries queries (it would take ~20 min for 100k
at 1M on 2 cores); recall is measured on those.

    python benchmarks/knn_join.py                                  # 1M x 768, 100k queries (target)
    python benchmarks/knn_join.py --vectors 100000 --queries 10000 # scaled down
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    from audit.pipeline.detection import _fan_out, shard_actor_args, start_shard_actor

    shards = [s["shard"] for s in manifest["shards"]]
    n_actors = min(len(shards), int(ray.cluster_resources()["CPU"]))
    args = shard_actor_args(root, index_dir, shards, n_actors, nprobe, rerank)
    actors = [start_shard_actor(a) for a in args]
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
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16])
    parser.add_argument("--rerank", type=int, default=3)
    parser.add_argument("--exact-queries", type=int, default=5000)
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from audit.config import ReferenceSection
    from audit.pipeline.ray_setup import connect
    from audit.reference.index import build_index

    data = clustered(args.vectors + args.queries, args.dim, args.clusters, seed=0)
    base, queries = data[: args.vectors], data[args.vectors :].astype(np.float32)
    n_exact = min(args.exact_queries, args.queries)
    truth, exact_s = exact(base, queries[:n_exact], 10)
    results: dict[str, object] = {"exact_queries_per_s": n_exact / exact_s, "exact_timed_on": n_exact}
    print(f"exact: {n_exact / exact_s:.0f} queries/s", flush=True)
    connect(None)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp) / "ref", base, per_file=250_000)
        for shards in (args.shards, 2 * args.shards):
            index_dir = Path(tmp) / "ref" / f"index{shards}"
            section = ReferenceSection(flat_max_vectors=1, vectors_per_shard=-(-args.vectors // shards),
                                       train_sample=args.train_sample, nprobe=args.nprobe[0], rerank=args.rerank)
            if shards != args.shards:  # the same training: copy it instead of training again
                index_dir.mkdir()
                for name in ("trained.faiss", "trained.json"):
                    shutil.copy(Path(tmp) / "ref" / f"index{args.shards}" / name, index_dir / name)
            began = time.perf_counter()
            manifest = build_index(Path(tmp) / "ref", section, index_dir)
            build_s = time.perf_counter() - began
            sizes = [(index_dir / s["file"]).stat().st_size for s in manifest["shards"]]
            for nprobe in args.nprobe:
                rows, seconds, peaks = join(Path(tmp) / "ref", index_dir, manifest, queries, 10, args.batch,
                                            nprobe, args.rerank)
                recall = float(np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows[:n_exact], truth)]))
                results[f"shards={shards},nprobe={nprobe}"] = {
                    "build_s": build_s, "queries_per_s": args.queries / seconds, "recall@10": recall,
                    "factory": manifest["factory"], "nprobe": nprobe,
                    "speedup_vs_exact": (args.queries / seconds) / results["exact_queries_per_s"],
                    "peak_rss_mb": [p / 2**20 for p in peaks], "index_file_mb": [b / 2**20 for b in sizes],
                }
                print(f"shards={shards} nprobe={nprobe}: {args.queries / seconds:.0f} queries/s, recall {recall:.3f}",
                      flush=True)
    ray.shutdown()
    print(f"reference {args.vectors} x {args.dim} (clustered), {args.queries} queries, k=10")
    print(f"exact IndexFlatIP, one process, all cores: {results['exact_queries_per_s']:.0f} queries/s "
          f"(timed on {n_exact} queries)")
    for key, r in results.items():
        if not key.startswith("shards="):
            continue
        print(f"{key}: index build {r['build_s']:.0f} s ({r['factory']}); join (nprobe {r['nprobe']}, re-rank "
              f"10x{args.rerank}) {r['queries_per_s']:.0f} queries/s = {r['speedup_vs_exact']:.1f}x exact, "
              f"recall@10 {r['recall@10']:.3f}; peak RSS per actor {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} "
              f"MB for index files of {', '.join(f'{m:.0f}' for m in r['index_file_mb'])} MB")
    for nprobe in args.nprobe:
        a, b = results[f"shards={args.shards},nprobe={nprobe}"], results[f"shards={2 * args.shards},nprobe={nprobe}"]
        print(f"nprobe {nprobe}, doubling shards: throughput x{b['queries_per_s'] / a['queries_per_s']:.2f} "
              f"(on the same cores: 1.0 means no loss from the extra fan-out)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
