"""What syncing a large run's mirror from a bucket costs: ``RunMirror.sync`` over a run-like tree
of N shards x 5 tables (a shard file and its JSON completion marker each, plus ``run.json``, the
prompts table and a report page), the current code side by side with a baseline commit's.

The bucket is served by moto's server mode on 127.0.0.1 (the tests' S3-compatible server, single
threaded Python: the times are an upper bound on a real object store's). Each measurement is one
sync in a fresh Python process, so its peak RSS is its own: a **first** sync into an empty cache
(every shard fetched) and a **no-op** sync right after it (nothing changed: no marker may be read
and no shard fetched again). The HTTP requests each sync made are counted from the server's
request log. See docs/architecture.md, "Locations".

    python benchmarks/object_store_sync.py                          # 2,000 shards -> 20,004 objects
    python benchmarks/object_store_sync.py --shards 200 --baseline none --json sync.json

``measure_sync(uri, cache)`` is the one-sync measurement other benchmarks (a scale sweep) can call
with the S3 environment (``AWS_ENDPOINT_URL``, credentials) set.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' S3-compatible server
sys.path.insert(0, str(REPO))

BASELINE = "b0c16b8"  # before the paginated, batched sync: one find of every object, one cat of every marker
TABLES = ("samples", "embeddings", "neighbors", "matches", "prompt_scores")
_REQUEST = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP')


def run_tree(shards: int, shard_bytes: int = 512) -> dict[str, bytes]:
    """The objects of a run-like folder (relative path -> bytes): every table's shards with their
    markers (as :class:`audit.shard_writer.ShardWriter` writes them), run.json, prompts, a report page."""
    from audit.files import encode_marker, marker_fields

    objects: dict[str, bytes] = {"run.json": json.dumps({"run_id": "bench"}).encode(),
                                 "prompts/prompts.parquet": os.urandom(4096),
                                 "report/index.html": b"<html></html>"}
    for table in TABLES:
        for i in range(shards):
            shard = f"shard-{i:05d}"
            data = os.urandom(shard_bytes)
            marker = marker_fields(time.time(), shard=shard, file=f"{shard}.parquet", rows=8,
                                   status_counts={"ok": 8}, first_error=None, bytes=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(), inputs={"samples": "0" * 64})
            objects[f"{table}/{shard}.parquet"] = data
            objects[f"{table}/_markers/{shard}.json"] = encode_marker(marker)
    return objects


def put_tree(uri: str, objects: dict[str, bytes], batch: int = 1000) -> float:
    """Upload ``objects`` under ``uri`` (shards before markers); returns the seconds it took."""
    from audit.remote import RemoteFolder

    remote = RemoteFolder(uri)
    start = time.perf_counter()
    names = sorted(objects, key=lambda rel: "/_markers/" in rel)
    for i in range(0, len(names), batch):
        remote.fs.pipe({remote._key(rel): objects[rel] for rel in names[i:i + batch]})
    return time.perf_counter() - start


def _baseline_modules(commit: str, folder: Path) -> None:
    """The baseline's ``audit/remote.py`` and ``audit/run_mirror.py`` as modules ``old_remote`` and
    ``old_run_mirror`` in ``folder`` (the latter importing the former)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("remote", "run_mirror"):
        text = subprocess.run(["git", "show", f"{commit}:audit/{name}.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        (folder / f"old_{name}.py").write_text(text.replace("from audit.remote import", "from old_remote import"))


def _mirror(code: str, uri: str, baseline_dir: Path | None) -> Any:
    """The RunMirror of ``uri`` in this process's cache: the current one, or the baseline's."""
    from audit.location import Location

    where = Location.of(uri)
    if code == "new":
        from audit.run_mirror import RunMirror

        return RunMirror(where)
    assert baseline_dir is not None
    sys.path.insert(0, str(baseline_dir))
    old_remote = importlib.import_module("old_remote")
    spec = importlib.util.spec_from_file_location("old_run_mirror", baseline_dir / "old_run_mirror.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RunMirror(SimpleNamespace(remote=old_remote.RemoteFolder(uri), local=where.local))


def _rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sampling_peak(stop: threading.Event, peak: list[float]) -> None:
    """Keep ``peak[0]`` at the highest resident memory seen every 5 ms until ``stop`` is set."""
    while not stop.wait(0.005):
        peak[0] = max(peak[0], _rss_mb())


def _child(code: str, uri: str, baseline_dir: Path | None, trace: bool) -> dict[str, Any]:
    """One sync in this process: wall seconds, files fetched, resident memory before it and its
    peak during it (sampled: the process's lifetime peak is set by imports), with ``trace`` the
    peak of traced Python allocations."""
    import tracemalloc

    mirror = _mirror(code, uri, baseline_dir)
    if hasattr(mirror.remote.fs, "connect"):
        mirror.remote.fs.connect()  # the S3 client set up (its API models loaded) before measuring, no request
    before = _rss_mb()
    peak, stop = [before], threading.Event()
    sampler = threading.Thread(target=_sampling_peak, args=(stop, peak), daemon=True)
    if trace:
        tracemalloc.start()
    sampler.start()
    start = time.perf_counter()
    fetched = mirror.sync()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    out = {"wall_s": round(wall, 3), "fetched": fetched, "rss_before_mb": round(before, 1),
           "rss_peak_mb": round(max(peak[0], _rss_mb()), 1)}
    out["rss_growth_mb"] = round(out["rss_peak_mb"] - before, 1)
    if trace:
        out["python_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    return out


def _requests(log: Path, since: int) -> dict[str, int]:
    """HTTP requests the server logged after byte ``since``, by kind."""
    kinds: Counter[str] = Counter()
    with log.open("rb") as handle:
        handle.seek(since)
        for line in handle.read().decode(errors="replace").splitlines():
            match = _REQUEST.search(line)
            if match:
                verb, path = match.groups()
                kinds["list" if verb == "GET" and "list-type=2" in path else verb.lower()] += 1
    return dict(kinds)


def measure_sync(uri: str, cache: Path, code: str = "new", baseline_dir: Path | None = None,
                 server_log: Path | None = None, trace: bool = False) -> dict[str, Any]:
    """One ``RunMirror.sync`` of ``uri`` into the cache ``cache``, in a fresh process: its wall
    seconds, files fetched, resident memory before and at peak (MiB), with ``trace`` the peak of traced Python
    allocations, and with ``server_log`` (the S3 server's request log) the requests it made."""
    since = server_log.stat().st_size if server_log is not None and server_log.exists() else 0
    argv = [sys.executable, __file__, "--child", code, "--uri", uri]
    argv += ["--baseline-dir", str(baseline_dir)] if baseline_dir is not None else []
    argv += ["--trace"] if trace else []
    done = subprocess.run(argv, env={**os.environ, "MEMAUDIT_CACHE": str(cache)}, check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if server_log is not None:
        time.sleep(0.2)  # the server writes its log line after the response
        result["requests"] = _requests(server_log, since)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2000, help="shards per table (5 tables, 2 objects each)")
    parser.add_argument("--baseline", default=BASELINE, help="commit to compare against, or 'none'")
    parser.add_argument("--trace", action="store_true", help="also trace Python allocations (slower)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.uri, args.baseline_dir, args.trace)))
        return

    from helpers import environment, s3, s3_server

    work = Path(tempfile.mkdtemp(prefix="memaudit-bench-sync-"))
    codes = ["new"] if args.baseline == "none" else ["old", "new"]
    baseline_dir = None
    if "old" in codes:
        baseline_dir = work / "baseline"
        _baseline_modules(args.baseline, baseline_dir)
    log = work / "s3-requests.log"
    uri = "s3://bench/model=bench/checkpoint=c/run=r"
    results: dict[str, Any] = {"shards_per_table": args.shards, "baseline": args.baseline}
    with s3_server(log) as env, environment(env):
        s3(env).mkdir("bench")
        objects = run_tree(args.shards)
        results["objects"] = len(objects)
        results["upload_s"] = round(put_tree(uri, objects), 1)
        print(f"{len(objects)} objects uploaded in {results['upload_s']} s", flush=True)
        for code in codes:
            cache = work / f"cache-{code}"
            for phase in ("first", "noop"):
                got = measure_sync(uri, cache, code, baseline_dir, log, args.trace)
                results[f"{code}_{phase}"] = got
                print(f"{code:>3} {phase:>5} sync: {got}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
