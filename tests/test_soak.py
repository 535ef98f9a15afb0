"""Soak (slow): a 10k-sample audit of the trained testbed while actors are killed at random.

Every few seconds one live memaudit actor (generation, embedding, index shard or detection) is
SIGKILLed. The run must still end complete, and ``memaudit verify`` must reconcile it exactly:
every planned sample_id once, markers matching files and checksums. Duration and peak memory are
printed (run with ``-s`` to see them): ``./scripts/test.sh tests/test_soak.py --run-slow -s``.
"""

from __future__ import annotations

import json
import random
import resource
import threading
import time
from pathlib import Path

import pytest

from audit.cli import main
from helpers import write_config

ACTORS = ("ray::StepWorker", "ray::IndexShardActor")  # every step runs in a StepWorker
N_PROMPTS, SAMPLES_PER_PROMPT = 1250, 8


class Killer(threading.Thread):
    """SIGKILLs a random memaudit actor every ``every`` seconds (±50%) and samples their memory.

    Killing much more often than a worker needs to start (load its model) and finish a shard
    would only measure how long nothing gets done."""

    def __init__(self, every: float, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.every, self.rng = every, random.Random(seed)
        self.kills: dict[str, int] = {}
        self.peak_actor_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        next_kill = time.time() + self.every
        while not self.stop.wait(0.2):
            actors = []
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                title = " ".join(proc.info["cmdline"] or [])
                kind = next((a for a in ACTORS if title.startswith(a)), None)
                if kind and proc.info["memory_info"] is not None:
                    actors.append((kind, proc))
            self.peak_actor_rss = max(self.peak_actor_rss, sum(p.info["memory_info"].rss for _, p in actors))
            if actors and time.time() >= next_kill:
                kind, victim = self.rng.choice(actors)
                try:
                    victim.kill()
                    self.kills[kind] = self.kills.get(kind, 0) + 1
                except psutil.NoSuchProcess:
                    pass
                next_kill = time.time() + self.every * self.rng.uniform(0.5, 1.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~9-11 min on a 2-core machine: over the suite's 10-minute default
def test_ten_thousand_samples_with_random_actor_kills_reconcile_exactly(ray_local: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from audit.config import PromptsSection
    from audit.prompts import read_prompts

    captions = sorted(set(read_prompts(PromptsSection(source="builtin:testbed")).prompts))
    texts = [f"{captions[i % len(captions)]}, take {i // len(captions)}" for i in range(N_PROMPTS)]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "soak.yaml", run={"root": str(tmp_path / "runs")}, model={"path": "builtin:testbed"},
                       embedding={"kind": "builtin", "model": "testbed-copy"}, reference={"path": "builtin:testbed"},
                       prompts={"source": str(tmp_path / "prompts.txt")},
                       generation={"samples_per_prompt": SAMPLES_PER_PROMPT, "steps": 4, "prompts_per_shard": 10},
                       compute={"batch_size": 40, "num_workers": 2, "max_attempts": 50})
    killer = Killer(every=10.0)
    started = time.time()
    killer.start()
    try:
        code = main(["run", str(cfg), "--no-report"])
    finally:
        killer.stop.set()
        killer.join()
    seconds = time.time() - started
    out = capsys.readouterr().out
    assert code == 0, out
    run = Path(next(line for line in out.splitlines() if line.startswith("run: ")).removeprefix("run: "))
    assert main(["verify", str(run), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["ok"] and found["planned_samples"] == found["present_samples"] == N_PROMPTS * SAMPLES_PER_PROMPT, found
    assert sum(killer.kills.values()) >= 5, killer.kills
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with capsys.disabled():
        print(f"\nsoak: {N_PROMPTS * SAMPLES_PER_PROMPT} samples in {seconds:.0f} s with {killer.kills} kills; "
              f"driver peak RSS {driver_peak / 2**20:.0f} MiB, actors' peak total RSS "
              f"{killer.peak_actor_rss / 2**20:.0f} MiB; verify: {found['problems'] or 'OK'}")
