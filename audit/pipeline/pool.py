"""Running shard tasks on a pool of Ray actors, with retries and progress.

Each actor loads its model once (in ``__init__``) and writes whole shards itself (temporary
file, rename, marker), so bulk data never passes through the driver, which only holds task
names and the small completion markers the actors return. An actor that dies is replaced and
its task retried; a task that keeps failing is reported and left for the next run to redo.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from audit.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: ``actor.run(*args)`` publishes one shard and returns its marker."""

    name: str
    args: tuple[Any, ...]
    units: int  # items it produces, for progress


@dataclass
class PoolReport:
    markers: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    window_s: float = 0.0  # first task start to last task end, on the workers


def reason(exc: BaseException) -> str:
    """The last line of a Ray error's cause: what a user needs to read."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


class StageActor:
    """Base of memaudit's Ray actors: a validated config, worker logging, ``describe``."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from audit.config import AuditConfig

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.cfg = AuditConfig.model_validate(cfg)

    def describe(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid()}


class ActorPool:
    """Actors of one class, started on demand and replaced when they die."""

    def __init__(self, actor_class: Any, args: tuple[Any, ...], resources: dict[str, float], what: str) -> None:
        self.actor_class, self.args, self.resources, self.what = actor_class, args, resources, what
        self.workers: list[Any] = []

    def start(self) -> Any:
        worker = self.actor_class.options(**self.resources).remote(*self.args)
        try:
            info = ray.get(worker.describe.remote())
        except RayActorError as exc:
            raise RuntimeError(f"a {self.what} worker failed to start: {reason(exc)}") from None
        log.info("%s worker ready: %s", self.what, info)
        self.workers.append(worker)
        return worker

    def replace(self, dead: Any) -> Any:
        if dead in self.workers:
            self.workers.remove(dead)
        return self.start()

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers.clear()


def run_tasks(pool: ActorPool, n_workers: int, tasks: list[ShardTask], max_attempts: int,
              unit: str, desc: str) -> PoolReport:
    """Run every task on at most ``n_workers`` actors of ``pool``; never raises for a task."""
    report = PoolReport()
    queue = deque(tasks)
    attempts: dict[str, int] = {}
    in_flight: dict[Any, tuple[Any, ShardTask]] = {}

    def submit(worker: Any) -> None:
        if queue:
            task = queue.popleft()
            in_flight[worker.run.remote(*task.args)] = (worker, task)

    total = sum(task.units for task in tasks)
    try:
        with Progress(desc, unit, total, tasks=len(tasks)) as progress:
            for _ in range(min(n_workers, len(tasks))):
                submit(pool.start())
            progress.restart_clock()  # rates count work, not start-up
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                worker, task = in_flight.pop(ready[0])
                try:
                    marker = ray.get(ready[0])
                except (RayActorError, RayTaskError) as exc:
                    attempts[task.name] = attempts.get(task.name, 0) + 1
                    why = reason(exc)
                    if attempts[task.name] < max_attempts:
                        log.warning("%s failed (attempt %d): %s; retrying", task.name, attempts[task.name], why)
                        queue.appendleft(task)
                    else:
                        log.error("%s failed %d times, giving up for this run: %s", task.name, attempts[task.name], why)
                        report.failed[task.name] = why
                    if isinstance(exc, RayActorError):
                        worker = pool.replace(worker)
                    submit(worker)
                    continue
                report.markers.append(marker)
                progress.update(task.units)
                submit(worker)
    finally:
        pool.shutdown()
    starts = [float(m.get("started_at", 0)) for m in report.markers]
    ends = [float(m.get("finished_at", 0)) for m in report.markers]
    if starts:
        report.window_s = max(ends) - min(starts)
    return report
