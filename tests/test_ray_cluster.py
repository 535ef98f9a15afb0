"""Which Ray a command uses when a cluster runs on the same machine (audit/pipeline/ray_setup.py):
a real head started by `ray start --head --block` stands in for a user's cluster. Without an
address `memaudit run` starts its own private Ray and leaves the cluster alone; `auto` joins it;
an address nobody listens on is refused in seconds with exit 2, before anything is written."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.cli import main
from helpers import PROMPTS, free_port, write_config

RAY = str(Path(sys.executable).parent / "ray")
CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records its cluster for Ray's lookup
# token authentication, as a real cluster has it: the head, its drivers and memaudit get the token
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
FIX = "start the cluster (ray start --head), correct the address, or leave --address/RAY_ADDRESS unset"

# A separate driver on the head: its job table and live nodes (this process never imports Ray).
CHECK = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
print(json.dumps({"jobs": state.jobs(), "nodes": sum(1 for n in ray.nodes() if n["Alive"])}, default=str))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment with the cluster's token and without any Ray address (nor the loopback
    switch an in-process Ray sets)."""
    drop = {"RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "RAY_USAGE_STATS_ENABLED": "0", **AUTH, **extra}


def _stop_with_this_process() -> None:
    """In the child, before `ray start` runs: Linux sends it SIGTERM when the test process dies, so
    even a killed test session leaves no cluster behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A 1-CPU head on 127.0.0.1 run by `ray start --block`: terminating that one process tears the
    cluster down (never `ray stop`, which would stop every Ray on the machine)."""
    before = CLUSTER_FILE.read_text() if CLUSTER_FILE.exists() else None
    port = free_port()
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_stop_with_this_process)
    try:
        deadline = time.time() + 90
        while not (CLUSTER_FILE.exists() and CLUSTER_FILE.read_text().strip().endswith(f":{port}")):
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "ray start did not record its cluster within 90 s"
            time.sleep(0.5)
        yield {"proc": proc, "gcs": f"127.0.0.1:{port}", "record": CLUSTER_FILE.read_text()}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # `ray start` leaves its record behind: put back what was there unless another cluster took over
        if CLUSTER_FILE.exists() and CLUSTER_FILE.read_text().strip().endswith(f":{port}"):
            if before is None:
                CLUSTER_FILE.unlink()
            else:
                CLUSTER_FILE.write_text(before)


def on_the_head(head: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECK, head["gcs"]], env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_config(folder: Path, checkpoint: Path) -> Path:
    """2 prompts, 1 sample each, 2 steps, one shard, no reference."""
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n", encoding="utf-8")
    return write_config(folder / "audit.yaml", run={"root": str(folder / "runs"), "seed": 0},
                        model={"path": str(checkpoint)}, prompts={"source": str(prompts)},
                        generation={"samples_per_prompt": 1, "steps": 2, "prompts_per_shard": 2},
                        compute={"batch_size": 2, "num_workers": 1})


def memaudit(*args: str, env: dict[str, str], timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], int]:
    """`memaudit ARGS` in a fresh process: (its result, its pid)."""
    proc = subprocess.Popen([sys.executable, "-m", "audit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def test_without_an_address_a_run_uses_a_private_ray_and_leaves_the_cluster_alone(
        head: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_checkpoint)
    done, pid = memaudit("-q", "run", str(cfg), "--no-report", env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert head["proc"].poll() is None, "the cluster died"
    assert CLUSTER_FILE.read_text() == head["record"]  # Ray's lookup still finds the `ray start` cluster
    seen = on_the_head(head)
    assert seen["nodes"] == 1  # the private Ray did not join as a node
    mine = [j for j in seen["jobs"] if j["DriverPid"] == pid or "audit.cli" in j["Entrypoint"]]
    assert not mine, f"memaudit ran a job on the cluster: {mine}"


def test_address_auto_joins_the_cluster_ray_start_runs_here(head: dict) -> None:
    code = ("import ray; from audit.pipeline.ray_setup import connect\n"
            "print(connect('auto'), ray.get_runtime_context().gcs_address.rsplit(':', 1)[1])")
    done = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["False", head["gcs"].rsplit(":", 1)[1]]  # joined (not started) the head


# Without the quick check, Ray's join of a dead address blocks this process in native code, deaf to
# signals: the thread method ends the session instead of hanging it.
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_an_address_nobody_listens_on_is_refused_in_seconds(
        how: str, head: dict, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    cfg = tiny_config(tmp_path, tiny_checkpoint)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if how == "--address":
        flag, origin = ["--address", address], "--address/compute.address"
    else:
        flag, origin = [], "RAY_ADDRESS"
        monkeypatch.setenv("RAY_ADDRESS", address)
    started = time.time()
    code = main(["-q", "run", str(cfg), *flag])  # in this process: the refusal comes before Ray is touched
    took = time.time() - started
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"memaudit: error: {origin} {address}: "), lines
    assert FIX in lines[0], lines[0]
    assert took < 30, f"refused after {took:.0f} s"  # Ray itself keeps trying for a minute or more
    assert not (tmp_path / "runs").exists()
