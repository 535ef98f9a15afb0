"""Driver and actor peak memory as an audit grows from 1k to 100k samples.

The driver holds the prompt plan, shard names and the small completion markers the actors
return; images, embeddings and neighbors never pass through it. So its peak memory should stay
flat (target: <= +10% from 1k to 100k samples) while the work grows 100x. Each size is a real
`memaudit run` (tiny checkpoint, 1 step, no CFG, so that 100k samples fit a 2-core machine in
minutes; the driver's work per sample does not depend on the model) against a Ray started once
with ``ray start``; the driver reports its own ru_maxrss, and the actors' total RSS is sampled.

    python benchmarks/memory.py                          # 1k, 10k, 100k samples
    python benchmarks/memory.py --sizes 1000 10000 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from local_cluster import LocalCluster, run_driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--samples-per-prompt", type=int, default=10)
    parser.add_argument("--prompts-per-shard", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="memaudit-memory-") as tmp, LocalCluster([args.cpus]) as cluster:
        for size in args.sizes:
            n_prompts = size // args.samples_per_prompt
            prompts = Path(tmp) / f"prompts-{size}.txt"
            prompts.write_text("\n".join(f"memory benchmark prompt {i}" for i in range(n_prompts)) + "\n")
            run = run_driver(["-q", "run", "--no-report", "--address", cluster.address,
                              "--set", f"run.root={Path(tmp) / 'runs'}", "--set", "model.path=builtin:tiny",
                              "--set", f"prompts.source={prompts}", "--set", "reference.path=null",
                              "--set", f"generation.samples_per_prompt={args.samples_per_prompt}",
                              "--set", "generation.steps=1", "--set", "generation.guidance_scale=1.0",
                              "--set", f"generation.prompts_per_shard={args.prompts_per_shard}",
                              "--set", f"compute.batch_size={args.batch_size}"], env=cluster.env)
            if run.code != 0:
                raise SystemExit(f"memaudit run failed at {size} samples:\n{run.output[-3000:]}")
            results.append({"samples": size, "shards": -(-n_prompts // args.prompts_per_shard),
                            "seconds": run.seconds, "driver_peak_mib": run.driver_peak_bytes / 2**20,
                            "actors_peak_mib": run.actors_peak_bytes / 2**20})
            print(f"{size} samples: {run.seconds:.0f} s, driver peak {results[-1]['driver_peak_mib']:.0f} MiB, "
                  f"actors' peak total {results[-1]['actors_peak_mib']:.0f} MiB", flush=True)
    base = results[0]["driver_peak_mib"]
    print("| samples | shards | seconds | driver peak RSS | vs smallest | actors' peak total RSS |")
    print("|---|---|---|---|---|---|")
    for r in results:
        r["driver_vs_smallest"] = r["driver_peak_mib"] / base - 1
        print(f"| {r['samples']:,} | {r['shards']} | {r['seconds']:.0f} | {r['driver_peak_mib']:.0f} MiB | "
              f"{100 * r['driver_vs_smallest']:+.1f}% | {r['actors_peak_mib']:.0f} MiB |")
    print(f"driver growth from {results[0]['samples']:,} to {results[-1]['samples']:,} samples: "
          f"{100 * results[-1]['driver_vs_smallest']:+.1f}% (target <= +10%)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
