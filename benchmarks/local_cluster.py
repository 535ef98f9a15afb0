"""Helpers for benchmarks that need a Ray cluster of their own and a driver in its own process:
``ray start`` nodes on 127.0.0.1 (each with its CPUs and a marker resource), `memaudit run` as a
subprocess whose peak memory, and the peak total memory of memaudit's actors, are sampled, and
a table's busy window as the workers recorded it in the shards' markers."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
DRIVER = ("import resource, sys\nfrom audit.cli import main\ncode = main(sys.argv[1:])\n"
          "print('driver peak RSS KiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)\n")
ACTORS = ("ray::StepWorker", "ray::IndexShardActor")  # every step runs in a StepWorker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """``ray start --head`` plus one ``ray start --address`` per further node; stopped on exit."""

    def __init__(self, cpus_per_node: list[int]) -> None:
        self.port = _free_port()
        self.temp = Path("/tmp") / f"ray-bench-{os.getpid()}"  # Unix socket paths must stay short
        # token authentication, as a real cluster has it; drivers get the token through ``env``
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.cpus = cpus_per_node

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalCluster:
        head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                f"--num-cpus={self.cpus[0]}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                '--resources={"node_0": 1}']
        subprocess.run(head, env=self.env, check=True, capture_output=True, timeout=180)
        for i, cpus in enumerate(self.cpus[1:], start=1):
            subprocess.run([RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                            f"--num-cpus={cpus}", f'--resources={{"node_{i}": 1}}'],
                           env=self.env, check=True, capture_output=True, timeout=180)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)


@dataclass
class DriverRun:
    code: int
    seconds: float
    driver_peak_bytes: int
    actors_peak_bytes: int
    output: str


def run_driver(args: list[str], env: dict[str, str] | None = None, interval: float = 0.2,
               own_only: bool = False) -> DriverRun:
    """`memaudit ARGS` in a subprocess: its exact peak RSS (it reports its own ru_maxrss) and the
    memaudit actors' peak total RSS (sampled every ``interval`` s): every such actor on the
    machine, or with ``own_only`` only the driver's descendants (a driver that starts its own
    local Ray)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env or dict(os.environ), text=True)
    peaks = {"actors": 0}
    done = threading.Event()

    def candidates() -> list[psutil.Process]:
        if not own_only:
            return list(psutil.process_iter())
        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def sample() -> None:
        while not done.wait(interval):
            total = 0
            for p in candidates():
                try:
                    if " ".join(p.cmdline()).startswith(ACTORS):
                        total += p.memory_info().rss
                except psutil.Error:
                    continue
            peaks["actors"] = max(peaks["actors"], total)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    reported = [line for line in output.splitlines() if line.startswith("driver peak RSS KiB ")]
    driver = int(reported[-1].split()[-1]) * 1024 if reported else 0
    return DriverRun(proc.returncode, seconds, driver, peaks["actors"], output)


def busy_window(run: Path, table: str) -> tuple[int, float]:
    """(rows, seconds) of ``table`` in ``run``: first shard start to last shard finish, as the
    workers recorded them in the markers (worker start-up and model loading excluded)."""
    markers = [json.loads(p.read_text()) for p in (run / table / "_markers").glob("*.json")]
    seconds = max(m["finished_at"] for m in markers) - min(m["started_at"] for m in markers)
    return sum(int(m["rows"]) for m in markers), seconds
