"""Scaling: the same testbed audit on 1 and 2 generation workers, on one node and on a 2-node
local Ray cluster (two ``ray start`` nodes on this machine), and the efficiency per worker.

Generation images/s come from the shards' markers (first start to last finish on the workers), so
Ray start-up and model loading are not counted. Efficiency = rate with 2 workers / (2 x rate with
1 worker of the same size). On one 2-core machine the CPUs are shared: one node with 2 CPUs runs
1 worker with 2 threads or 2 workers with 1 thread each; the 2-node cluster has 1 CPU per node.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --samples 8 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from local_cluster import LocalCluster, busy_window, run_driver


def _rate(output: str) -> tuple[int, float]:
    run = Path(next(line for line in output.splitlines() if line.startswith("run: ")).removeprefix("run: "))
    rows, seconds = busy_window(run, "samples")
    return rows, rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompts-per-shard", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the single node (each of the 2 nodes gets half)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cases = [("1 node", [args.cpus], 1), ("1 node", [args.cpus], 2),
             ("2 nodes", [args.cpus // 2, args.cpus // 2], 1), ("2 nodes", [args.cpus // 2, args.cpus // 2], 2)]
    results = []
    with tempfile.TemporaryDirectory(prefix="memaudit-scaling-") as tmp:
        for i, (where, nodes, workers) in enumerate(cases):
            with LocalCluster(nodes) as cluster:
                run = run_driver(["-q", "run", "--no-report", "--address", cluster.address,
                                  "--set", f"run.root={Path(tmp) / f'case-{i}'}", "--set", "reference.path=null",
                                  "--set", f"prompts.limit={args.prompts}",
                                  "--set", f"generation.samples_per_prompt={args.samples}",
                                  "--set", f"generation.steps={args.steps}",
                                  "--set", f"generation.prompts_per_shard={args.prompts_per_shard}",
                                  "--set", f"compute.batch_size={args.batch_size}",
                                  "--set", f"compute.num_workers={workers}"], env=cluster.env)
            if run.code != 0:
                raise SystemExit(f"{where}, {workers} workers failed:\n{run.output[-3000:]}")
            rows, rate = _rate(run.output)
            results.append({"where": where, "nodes_cpus": nodes, "workers": workers, "samples": rows,
                            "images_per_s": rate, "command_s": run.seconds})
            print(f"{where} {nodes} CPUs, {workers} worker(s): {rate:.2f} images/s", flush=True)
    by = {(r["where"], r["workers"]): r for r in results}
    print(f"testbed, {results[0]['samples']} samples, {args.steps} steps, batch {args.batch_size}")
    print("| cluster | CPUs per node | workers | images/s | efficiency per worker |")
    print("|---|---|---|---|---|")
    for r in results:
        one = by[(r["where"], 1)]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (r["workers"] * one)
        print(f"| {r['where']} | {r['nodes_cpus']} | {r['workers']} | {r['images_per_s']:.2f} | {r['efficiency']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
