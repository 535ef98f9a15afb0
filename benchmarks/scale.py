"""Driver-side steps at 10⁵–10⁷ samples, on synthetic runs (docs/architecture.md, "Scale").

For each size (10 samples per prompt, 100 prompts per shard: 10⁴ → 10⁶ prompts, 100 → 10⁴
shards) a synthetic run (``benchmarks/synthetic_run.py``, valid in every contract) is written
once under ``--work`` and reused; then each step runs as its own process — as a user runs it —
and its wall time and peak resident memory (that process alone, sampled every 20 ms) are
recorded (each from a warm page cache, :func:`warm`):

- ``memaudit verify``, ``memaudit report``, ``memaudit compare RUN RUN`` (both sides read);
- a no-op resume, ``memaudit run CONFIG --no-report`` on the finished run (the driver's memory;
  Ray's own processes are not the driver);
- the analysts' notebook (``notebooks/analyst_queries.ipynb``), each query cell timed, the three
  heaviest reported;
- the floor: a pure DuckDB scan (2 threads) of the columns ``verify`` and ``report`` read, and
  the sha256 of every shard file (``verify`` checks each against its marker).

``--s3-size`` also puts that size in a bucket (moto's S3 server on 127.0.0.1) and measures
``verify`` and ``report`` of its URI from an empty cache (the first sync) and again (a no-op sync).

    python benchmarks/scale.py                                  # 10⁵, 10⁶, 10⁷ (~25 min, 15 GB)
    python benchmarks/scale.py --sizes 100000 1000000 --s3-size 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

SAMPLES_PER_PROMPT = 10
PROMPTS_PER_SHARD = 100
NOTEBOOK = ROOT / "notebooks" / "analyst_queries.ipynb"

# What verify and report read, as one DuckDB scan each (their floor).
VERIFY_SCAN = (("samples", "sample_id"), ("embeddings", "sample_id"), ("neighbors", "sample_id"),
               ("matches", "sample_id"), ("prompt_scores", "prompt_id"))
REPORT_SCAN = (("samples", "sample_id, status"), ("neighbors", "sample_id, rank, row, score"),
               ("matches", "sample_id, prompt_id, label, status, tiled_l2, split_product"),
               ("prompt_scores", "prompt_id, score, flagged, n_samples, clique_size, noise_magnitude, best_cosine, "
                                 "best_split_product, min_tiled_l2, screen_score, escalated"))


def measure(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``command``; its wall time, exit code and the peak resident memory of its process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    output = proc.communicate()[0]
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 5):  # verify's 5 is a finding, not a failure
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{output[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1), "exit": proc.returncode,
            "output": output}


def memaudit(*args: str) -> list[str]:
    return [sys.executable, "-m", "audit.cli", *args]


def synthetic(work: Path, n_samples: int, s3: str | None = None) -> dict[str, Any]:
    """The synthetic run of ``n_samples`` under ``work`` (written on the first call)."""
    out = work / f"synthetic-{n_samples}{'-s3' if s3 else ''}"
    record = out / "synthetic.json"
    if record.is_file() and not s3:
        return json.loads(record.read_text())
    command = [sys.executable, str(HERE / "synthetic_run.py"), "--prompts", str(n_samples // SAMPLES_PER_PROMPT),
               "--samples-per-prompt", str(SAMPLES_PER_PROMPT), "--prompts-per-shard", str(PROMPTS_PER_SHARD),
               "--memorized", str(max(10, n_samples // 10_000)), "--out", str(out), "--json", str(record)]
    if s3:
        command += ["--s3", s3]
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(record.read_text())


def floor(run: Path, scans: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """A pure DuckDB scan of ``scans`` (table, columns) of the run, in a fresh process: the max of
    every column, so that each one is read and decoded."""
    query = ", ".join(f"(select [{', '.join(f'max({c})::varchar' for c in columns.split(', '))}] "
                      f"from read_parquet('{run}/{table}/*.parquet'))" for table, columns in scans)
    code = ("import duckdb, sys; con = duckdb.connect(config={'threads': 2}); "
            "print(con.sql(sys.argv[1]).fetchall())")
    return measure([sys.executable, "-c", code, f"select {query}"])


def hashing(run: Path) -> dict[str, Any]:
    """sha256 of every shard file (what verify checks besides the ids), on verify's threads, in a
    fresh process."""
    code = ("import hashlib, sys; from concurrent.futures import ThreadPoolExecutor; from pathlib import Path\n"
            "def h(p):\n    d = hashlib.sha256()\n    with open(p, 'rb') as f:\n"
            "        for b in iter(lambda: f.read(8 << 20), b''): d.update(b)\n    return d.hexdigest()\n"
            "files = sorted(Path(sys.argv[1]).glob('*/*.parquet'))\n"
            "with ThreadPoolExecutor(4) as pool: print(len(list(pool.map(h, files))))\n")
    return measure([sys.executable, "-c", code, str(run)])


def notebook(runs_root: Path) -> list[dict[str, Any]]:
    """Each code cell of the analysts' notebook, executed in order in one fresh process; each
    cell's time, and the process's peak memory."""
    cells = [("".join(c["source"])) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    script = Path(tempfile.mkdtemp()) / "cells.py"
    script.write_text("import json, sys, time\ncells = json.loads(sys.argv[1])\ntimes = []\nscope = {}\n"
                      "for cell in cells:\n    t = time.perf_counter()\n    exec(cell, scope)\n"
                      "    times.append(time.perf_counter() - t)\nprint('TIMES', json.dumps(times))\n")
    whole = measure([sys.executable, str(script), json.dumps(cells)], env={"MEMAUDIT_RUNS": str(runs_root),
                                                                         "PYTHONPATH": str(ROOT)}, cwd=NOTEBOOK.parent)
    times = json.loads(next(line for line in whole.pop("output").splitlines() if line.startswith("TIMES "))[6:])
    return [{"cell": i, "first_line": cells[i].strip().splitlines()[0][:60], "seconds": round(t, 2),
             "process_peak_mb": whole["peak_mb"]} for i, t in enumerate(times)]


def warm(run: Path) -> None:
    """Read every file of the run once, so that each measurement starts from the page cache (this
    machine reclaims cold pages in the background: a step timed after others would otherwise pay
    for disk reads its floor does not)."""
    for path in run.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                while handle.read(16 << 20):
                    pass


def one_size(work: Path, n_samples: int) -> dict[str, Any]:
    made = synthetic(work, n_samples)
    run, config = Path(made["run"]), made["config"]
    env_out = Path(tempfile.mkdtemp(prefix="memaudit-compare-"))
    found: dict[str, Any] = {"samples": n_samples, "prompts": made["n_prompts"], "shards": made["n_shards"],
                             "bytes": made["bytes"]}
    steps = {"verify": lambda: measure(memaudit("verify", str(run))),
             "report": lambda: measure(memaudit("report", str(run))),
             "compare": lambda: measure(memaudit("compare", str(run), str(run), "--out", str(env_out))),
             "noop_run": lambda: measure(memaudit("run", config, "--no-report"), env={"HF_HUB_OFFLINE": "1"}),
             "floor_verify": lambda: floor(run, VERIFY_SCAN),
             "hash_files": lambda: hashing(run),
             "floor_report": lambda: floor(run, REPORT_SCAN)}
    for step, timed in steps.items():
        warm(run)
        found[step] = timed()
    for step in steps:
        found[step]["output"] = found[step]["output"].strip().splitlines()[-4:]
    cells = notebook(Path(config).parent / "runs")
    found["notebook"] = sorted(cells, key=lambda c: -c["seconds"])[:3]
    return found


def object_store(work: Path, n_samples: int) -> dict[str, Any]:
    """verify and report of a bucket run: from an empty cache, then again."""
    from helpers import environment, s3, s3_server

    with s3_server() as env, environment(env):
        s3(env).mkdir("scale")
        made = synthetic(work, n_samples, s3="s3://scale/runs")
        cache = Path(tempfile.mkdtemp(prefix="memaudit-cache-"))
        with_cache = {**env, "MEMAUDIT_CACHE": str(cache)}
        found = {"samples": n_samples, "uri": made["s3"]}
        for step in ("verify", "report"):
            for when in ("first", "again"):
                found[f"{step}_{when}"] = measure(memaudit(step, made["s3"]), env=with_cache)
                found[f"{step}_{when}"]["output"] = found[f"{step}_{when}"]["output"].strip().splitlines()[-2:]
        return found


def table(results: list[dict[str, Any]]) -> str:
    steps = ("verify", "report", "compare", "noop_run", "floor_verify", "hash_files", "floor_report")
    lines = [f"{'samples':>10} {'shards':>6} " + " ".join(f"{s:>20}" for s in steps)]
    for r in results:
        lines.append(f"{r['samples']:>10,} {r['shards']:>6} " + " ".join(
            f"{r[s]['seconds']:>9.1f} s {r[s]['peak_mb']:>6.0f} MB" for s in steps))
    for r in results:
        lines.append(f"notebook at {r['samples']:,}: " + "; ".join(
            f"cell {c['cell']} ({c['first_line'][:30]}…) {c['seconds']:.1f} s" for c in r["notebook"])
            + f"; process peak {r['notebook'][0]['process_peak_mb']:.0f} MB")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets from the smallest to the largest size."""
    small, large = results[0], results[-1]
    found: dict[str, Any] = {}
    for step in ("verify", "report", "compare", "noop_run"):
        found[f"{step}_rss_ratio"] = round(large[step]["peak_mb"] / small[step]["peak_mb"], 3)
    found["verify_vs_floor"] = round(large["verify"]["seconds"] / large["floor_verify"]["seconds"], 2)
    found["verify_vs_floor_and_hashing"] = round(
        large["verify"]["seconds"] / (large["floor_verify"]["seconds"] + large["hash_files"]["seconds"]), 2)
    found["report_vs_floor"] = round(large["report"]["seconds"] / large["floor_report"]["seconds"], 2)
    if len(results) >= 2:
        before = results[-2]
        for step in ("verify", "report"):
            found[f"{step}_growth_last_x10"] = round(large[step]["seconds"] / before[step]["seconds"], 2)
    found["noop_run_seconds_largest"] = large["noop_run"]["seconds"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--s3-size", type=int, default=None, help="also measure a bucket run of this size")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "memaudit-scale")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the synthetic runs' neighbors name the built-in reference built in this cache: every step
    # must see the same one (another cache builds another index, and the no-op resume re-joins)
    os.environ.setdefault("MEMAUDIT_CACHE", str(args.work / "cache"))
    results = [one_size(args.work, n) for n in sorted(args.sizes)]
    print(table(results))
    summary: dict[str, Any] = {"results": results, "targets": targets(results)}
    if args.s3_size:
        summary["object_store"] = object_store(args.work, args.s3_size)
        o = summary["object_store"]
        print(f"object store at {o['samples']:,}: " + "; ".join(
            f"{k} {v['seconds']:.1f} s {v['peak_mb']:.0f} MB" for k, v in o.items() if isinstance(v, dict)))
    print(json.dumps(summary["targets"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
