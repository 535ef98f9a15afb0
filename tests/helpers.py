"""Helpers shared by the tests."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red vintage car parked on a cobblestone street",
    "the logo of a coffee shop, flat vector art",
    "portrait of a woman with a pearl earring, oil painting",
    "a golden retriever puppy playing in the snow",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "an aerial view of a city at night",
    "a watercolor painting of a lighthouse on a cliff",
]


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """Write a YAML config from keyword sections (run=..., model=..., ...)."""
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        pytest.skip(f"mounting needs root with CAP_SYS_ADMIN here: {result.stderr.strip()}")


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (tmpfs) mounted at ``path``, so writes can really fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "memaudit-test", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until the file system is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 2**16)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``view``: a read-only bind mount (root), else read-only permissions."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [source, *source.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield source
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    view.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(view))
    try:
        _mount("-o", "remount,bind,ro", str(view))
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def payload(run: Path) -> dict[str, tuple]:
    """Every sample's payload columns, by sample_id (a sample_id present twice fails here): equal for
    two runs means 0 lost, 0 duplicated, byte-identical."""
    import pyarrow.parquet as pq

    table = pq.read_table(run / "samples", columns=["sample_id", "seed", "image_png", "noise_magnitude", "status"])
    rows = {r["sample_id"]: (r["seed"], r["image_png"], r["noise_magnitude"], r["status"]) for r in table.to_pylist()}
    assert len(rows) == table.num_rows, "a sample_id is present more than once"
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(log: Path | None = None) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's server mode, a separate process on 127.0.0.1); yields
    the environment a client needs to reach it (endpoint and credentials). With ``log``, the
    server's request log (one line per HTTP request) is appended to that file."""
    import socket
    import sys
    import time

    port = free_port()
    sink = log.open("ab") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=sink)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAMOTOTESTSERVER",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-of-the-test-server", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if log is not None:
            sink.close()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def s3_bucket(name: str) -> Iterator[dict[str, str]]:
    """A real S3-compatible server holding the bucket ``name``, its endpoint and credentials in
    ``os.environ`` while open (start it before Ray: workers take the cluster's environment)."""
    with s3_server() as env, environment(env):
        s3(env).mkdir(name)
        yield env


def s3(env: dict[str, str]) -> Any:
    """An s3fs client of the test server (for setting up and inspecting buckets)."""
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def wait_for_marker(root: Path, proc: subprocess.Popen, table: str = "samples", timeout: float = 240) -> list[Path]:
    """The first completion markers of ``table`` under the run root ``root`` while ``proc`` runs."""
    import time

    markers: list[Path] = []
    deadline = time.time() + timeout
    while time.time() < deadline and not markers and proc.poll() is None:
        markers = list(root.glob(f"*/*/*/{table}/_markers/*.json"))
        time.sleep(0.05)
    return markers


def kill_step_workers_mid_run(argv: list[str], root: Path, table: str) -> tuple[list[Path], int, int, str]:
    """``memaudit ARGV`` in a subprocess; once its first ``table`` shard is published, SIGKILL every
    step worker (they are working on the next shards). Returns (the markers seen, workers killed,
    the command's exit code, its output)."""
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "audit.cli", "-q", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    markers = wait_for_marker(root, proc, table)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::StepWorker" in " ".join(p.info["cmdline"] or [])]
    for worker in workers if markers else []:
        worker.kill()
    output = proc.communicate(timeout=300)[0].decode(errors="replace")
    return markers, len(workers), proc.returncode, output
