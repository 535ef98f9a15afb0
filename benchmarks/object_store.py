"""What an object-store run root costs: the same audit with ``run.root`` on local disk and in an
S3 bucket, side by side in one process on one local Ray.

The bucket is served by moto's server mode on 127.0.0.1 (the tests' S3-compatible server): a
single-threaded Python server, so the S3 figures are an upper bound on the cost of a real object
store. Each round runs the local-root audit and the S3-root audit (fresh folder, fresh prefix and
fresh local cache each; which goes first alternates), then a no-op resume of the S3 run from another empty cache — what a
RayJob retried on fresh pods pays before it finds nothing to do. Medians over rounds.

    python benchmarks/object_store.py                      # testbed, 16 prompts x 4 samples, 10 steps, 2 rounds
    python benchmarks/object_store.py --prompts 8 --repeats 1 --json object_store.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' S3-compatible server

from helpers import environment, s3, s3_server  # noqa: E402

from audit.config import AuditConfig, load_config  # noqa: E402


def _config(args: argparse.Namespace, root: str, model: Path, reference: Path) -> AuditConfig:
    return load_config(None, [f"run.root={root}", f"model.path={model}", f"reference.path={reference}",
                              f"generation.samples_per_prompt={args.samples}",
                              f"generation.steps={args.steps}", f"prompts.limit={args.prompts}",
                              f"generation.prompts_per_shard={args.prompts_per_shard}"])


def timed_audit(cfg: AuditConfig, cache: Path) -> dict[str, Any]:
    """Wall seconds of `memaudit run` (audit + report) with ``cache`` as this machine's cache."""
    from audit.pipeline import run_audit
    from audit.report.build import write_report

    os.environ["MEMAUDIT_CACHE"] = str(cache)
    start = time.perf_counter()
    result = run_audit(cfg)
    write_report(result.location)
    return {"wall_s": time.perf_counter() - start, "samples_written": result.generation.rows_written,
            "location": result.location}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts-per-shard", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from audit.pipeline import connect
    from audit.pipeline.reference import prepare_reference
    from audit.testbed.checkpoints import builtin_checkpoint

    work = Path(tempfile.mkdtemp(prefix="memaudit-bench-s3-"))
    shared = work / "cache-builtin"  # the testbed checkpoint and reference, built once, copied by path
    os.environ["MEMAUDIT_CACHE"] = str(shared)
    paths = (builtin_checkpoint("testbed"), prepare_reference("builtin:testbed"))
    rounds = []
    with s3_server() as env, environment(env):
        client = s3(env)
        client.mkdir("bench")
        connect(None)
        for r in range(args.repeats):
            roots = {"local": str(work / f"runs-{r}"), "s3": f"s3://bench/runs-{r}"}
            order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]  # alternate: no order bias
            timed = {name: timed_audit(_config(args, roots[name], *paths), shared) for name in order}
            local, remote = timed["local"], timed["s3"]
            resume = timed_audit(_config(args, f"s3://bench/runs-{r}", *paths), work / f"cache-fresh-{r}")
            assert resume["samples_written"] == 0, resume
            objects = client.find(remote["location"].removeprefix("s3://"), detail=True)
            published = sum(int(info["size"]) for info in objects.values())
            rounds.append({"local_s": local["wall_s"], "s3_s": remote["wall_s"], "resume_s": resume["wall_s"],
                           "objects": len(objects), "published_mb": published / 2**20})
            print(f"round {r}: local root {local['wall_s']:.1f} s, s3 root {remote['wall_s']:.1f} s "
                  f"({len(objects)} objects, {published / 2**20:.1f} MiB), no-op resume on a fresh cache "
                  f"{resume['wall_s']:.1f} s", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("local_s", "s3_s", "resume_s", "published_mb")}
    result = {"samples": args.prompts * args.samples, "rounds": rounds, **med,
              "s3_vs_local": med["s3_s"] / med["local_s"], "objects": rounds[0]["objects"]}
    print(f"{result['samples']} samples: local root {med['local_s']:.1f} s, S3 root {med['s3_s']:.1f} s "
          f"= {result['s3_vs_local']:.3f}x; {result['objects']} objects, {med['published_mb']:.1f} MiB published; "
          f"no-op resume from the bucket on an empty cache {med['resume_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
