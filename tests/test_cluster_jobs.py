"""A real 2-node Ray cluster on this machine (`ray start --head` on 127.0.0.1 plus a second
`ray start --address` node with its own resources and its own local cache, like another
machine); the testbed audit is submitted through the Ray Jobs API, and submitting it again is a
no-op resume. With the run root in a bucket of a real S3-compatible server, the nodes share
nothing but the bucket."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from helpers import PROMPTS, payload, s3, s3_server, write_config

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    with s3_server() as env:
        yield env


@pytest.fixture(scope="module")
def cluster(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if shutil.which("ray", path=str(Path(RAY).parent)) is None:
        pytest.fail(f"{RAY} not found: the Ray CLI comes with ray[default]")
    temp = Path("/tmp") / f"ray-2node-{os.getpid()}"  # Unix socket paths must stay short
    gcs, dashboard = free_port(), free_port()
    # token authentication, as a real cluster has it: every node, driver and client gets the token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    # an in-process local Ray started earlier in this process (audit.pipeline.connect) turns multi-node
    # clusters off in os.environ to stay on the loopback; the cluster's nodes must not inherit that
    env = {k: v for k, v in {**os.environ, **s3_env}.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    caches = {node: tmp_path_factory.mktemp(f"cache-{node}") for node in ("head", "worker")}
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}", "--resources={\"head_node\": 1}"]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
              "--resources={\"second_node\": 1}"]
    try:
        for command, cache in ((head, caches["head"]), (worker, caches["worker"])):
            done = subprocess.run(command, env={**env, "MEMAUDIT_CACHE": str(cache)}, capture_output=True, text=True,
                                  timeout=180)
            assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
               "tmp": tmp_path_factory.mktemp("cluster"), "caches": caches, "s3": s3_env}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(json.dumps([sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]]))
"""


def cli(cluster: dict, *args: str, timeout: float = 120) -> str:
    """`ray job ...` against the cluster (a fresh process: Ray reads the auth token at import)."""
    done = subprocess.run([RAY, "job", args[0], "--address", cluster["dashboard"], *args[1:]], env=cluster["env"],
                          capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def submit_and_wait(cluster: dict, submission_id: str, entrypoint: list[str], timeout: float = 480) -> tuple[str, str]:
    cli(cluster, "submit", "--no-wait", "--submission-id", submission_id, "--", *entrypoint)
    return wait(cluster, submission_id, timeout)


def wait(cluster: dict, submission_id: str, timeout: float = 480) -> tuple[str, str]:
    """(final status, logs) of a submitted job."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = cli(cluster, "status", submission_id)
        for final in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"'{submission_id}' {final.lower()}" in status.lower() or f"status: {final}" in status:
                return final, cli(cluster, "logs", submission_id)
        time.sleep(3)
    raise TimeoutError(f"job {submission_id}: {cli(cluster, 'logs', submission_id)[-3000:]}")


def audit_entrypoint(tmp: Path, name: str, run_root: str, model: str) -> list[str]:
    """`jobs/run.py` on a 4-prompt audit (2 samples each, 2 steps, a shard per prompt, 2 workers)."""
    (tmp / f"{name}.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    cfg = write_config(tmp / f"{name}.yaml", run={"root": run_root}, model={"path": model},
                       prompts={"source": str(tmp / f"{name}.txt")},
                       generation={"samples_per_prompt": 2, "steps": 2, "prompts_per_shard": 1},
                       compute={"batch_size": 2, "num_workers": 2})
    return [sys.executable, str(REPO / "jobs" / "run.py"), str(cfg)]


@pytest.mark.slow  # ~85 s: two job submissions on two nodes; run with --run-slow
def test_audit_submitted_through_the_jobs_api_on_two_nodes_then_resubmitted(cluster: dict) -> None:
    nodes = json.loads(subprocess.run([sys.executable, "-c", NODES, cluster["gcs"]], env=cluster["env"], check=True,
                                      capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    assert len(nodes) == 2 and {"head_node", "second_node"} <= {r for n in nodes for r in n}
    entrypoint = audit_entrypoint(cluster["tmp"], "audit", str(cluster["tmp"] / "runs"), "builtin:tiny")
    status, logs = submit_and_wait(cluster, "audit-first", entrypoint)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "samples: 8 written this time (4 shards)" in logs and "report: " in logs
    run = Path(next(line for line in logs.splitlines() if line.startswith("run: ")).removeprefix("run: "))
    markers = [json.loads(p.read_text()) for p in sorted((run / "samples" / "_markers").glob("*.json"))]
    assert len(markers) == 4 and sum(m["rows"] for m in markers) == 8
    assert len({m["process_id"] for m in markers}) == 2  # two generation actors, one per 1-CPU node
    assert (run / "prompt_scores").is_dir() and (run / "report" / "index.html").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (run / "samples").glob("*.parquet")}

    status, logs = submit_and_wait(cluster, "audit-again", entrypoint)  # the same run again: a no-op resume
    assert status == "SUCCEEDED", logs[-3000:]
    assert "samples: 0 written this time (0 shards), 4 of 4 shards already complete" in logs
    assert {p: p.stat().st_mtime_ns for p in (run / "samples").glob("*.parquet")} == stamps


@pytest.mark.slow  # ~100 s (two submissions, two nodes, every file through the bucket); run with --run-slow
def test_object_store_audit_on_two_nodes_sharing_only_the_bucket_then_resubmitted(cluster: dict) -> None:
    from audit.testbed.checkpoints import builtin_checkpoint

    nodes = json.loads(subprocess.run([sys.executable, "-c", NODES, cluster["gcs"]], env=cluster["env"], check=True,
                                      capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    assert len(nodes) == 2
    client = s3(cluster["s3"])
    client.mkdir("audits")
    client.put(str(builtin_checkpoint("tiny")), "audits/models/tiny", recursive=True)
    entrypoint = audit_entrypoint(cluster["tmp"], "audit-s3", "s3://audits/runs", "s3://audits/models/tiny")
    status, logs = submit_and_wait(cluster, "audit-s3-first", entrypoint)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "samples: 8 written this time (4 shards)" in logs
    uri = next(line for line in logs.splitlines() if line.startswith("run: ")).removeprefix("run: ")
    assert uri.startswith("s3://audits/runs/model=tiny/") and f"report: {uri}/report/index.html" in logs
    key = uri.removeprefix("s3://")
    markers = [json.loads(client.cat(k)) for k in sorted(client.find(f"{key}/samples/_markers"))]
    assert len(markers) == 4 and sum(m["rows"] for m in markers) == 8
    assert len({m["process_id"] for m in markers}) == 2  # two generation actors, one per node
    assert client.exists(f"{key}/prompt_scores/_markers/shard-00003.json") and client.exists(f"{key}/report/index.html")
    mirrors = {node: cache / "mirror" / "s3" / key for node, cache in cluster["caches"].items()}
    assert all(len(list((m / "samples").glob("*.parquet"))) >= 1 for m in mirrors.values())  # each node wrote its own
    objects = {k: v["ETag"] for k, v in client.find(key, detail=True).items() if "/report/" not in k}

    status, logs = submit_and_wait(cluster, "audit-s3-again", entrypoint)  # the same run again: a no-op resume
    assert status == "SUCCEEDED", logs[-3000:]
    assert "samples: 0 written this time (0 shards), 4 of 4 shards already complete" in logs
    assert {k: v["ETag"] for k, v in client.find(key, detail=True).items() if "/report/" not in k} == objects


@pytest.mark.slow
def test_losing_a_worker_node_mid_run_still_completes_every_sample_once(cluster: dict) -> None:
    import psutil

    tmp = cluster["tmp"]
    (tmp / "prompts8.txt").write_text("\n".join(PROMPTS[:8]) + "\n")
    cfg = write_config(tmp / "node-loss.yaml", run={"root": str(tmp / "node-loss")},
                       model={"path": "builtin:tiny"}, prompts={"source": str(tmp / "prompts8.txt")},
                       generation={"samples_per_prompt": 16, "steps": 20, "prompts_per_shard": 1},
                       compute={"batch_size": 8, "num_workers": 2})  # shards of seconds: the kill lands mid-shard
    cli(cluster, "submit", "--no-wait", "--submission-id", "audit-node-loss", "--",
        sys.executable, str(REPO / "jobs" / "run.py"), str(cfg))
    deadline, pids = time.time() + 300, set()
    while time.time() < deadline and len(pids) < 2:  # both generation actors busy (each finished a shard)
        pids = {json.loads(p.read_text())["process_id"] for p in (tmp / "node-loss").glob("*/*/*/samples/_markers/*.json")}
        time.sleep(0.1)
    assert len(pids) == 2
    raylets = [p for p in psutil.process_iter(["cmdline"]) if "raylet" in " ".join(p.info["cmdline"] or [])[:200]
               and "second_node" in " ".join(p.info["cmdline"] or [])]
    assert len(raylets) == 1
    raylets[0].kill()  # the worker node is gone, with the generation actor it held
    status, logs = wait(cluster, "audit-node-loss")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "retrying" in logs, logs[-4000:]  # a shard was lost with the node and done again
    run = Path(next(line for line in logs.splitlines() if line.startswith("run: ")).removeprefix("run: "))
    from audit.cli import main

    assert main(["verify", str(run)]) == 0  # all 128 planned samples, each exactly once
    uninterrupted = write_config(tmp / "reference-run.yaml", **{**yaml.safe_load(cfg.read_text()),
                                                                "run": {"root": str(tmp / "uninterrupted")}})
    status, logs = submit_and_wait(cluster, "audit-uninterrupted",
                                   [sys.executable, str(REPO / "jobs" / "run.py"), str(uninterrupted)])
    assert status == "SUCCEEDED", logs[-4000:]
    other = Path(next(line for line in logs.splitlines() if line.startswith("run: ")).removeprefix("run: "))
    assert payload(run) == payload(other) and len(payload(run)) == 128  # byte-identical to a run without the loss
