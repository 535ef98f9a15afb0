"""Running shard tasks on a pool of Ray actors, with retries and progress.

Each actor loads its model once (in ``__init__``) and writes whole shards itself (temporary
file, rename, marker), so bulk data never passes through the driver, which only holds task
names and the small completion markers the actors return. An actor that dies is replaced and
its task retried; a task that keeps failing is reported and left for the next run to redo. A
write the storage refuses (disk full, read-only) stops the stage at once with a clear error.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from audit.errors import storage_error
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

    def launch(self) -> tuple[Any, Any]:
        """A new actor and the future of its ``describe()`` (ready when the actor is placed and loaded)."""
        worker = self.actor_class.options(**self.resources).remote(*self.args)
        self.workers.append(worker)
        return worker, worker.describe.remote()

    def ready(self, worker: Any, describe: Any) -> None:
        try:
            info = ray.get(describe)
        except RayActorError as exc:
            self.discard(worker)
            raise RuntimeError(f"a {self.what} worker failed to start: {reason(exc)}") from None
        log.info("%s worker ready: %s", self.what, info)

    def discard(self, worker: Any) -> None:
        if worker in self.workers:
            self.workers.remove(worker)

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers.clear()


def run_tasks(pool: ActorPool, n_workers: int, tasks: list[ShardTask], max_attempts: int,
              unit: str, desc: str) -> PoolReport:
    """Run every task on at most ``n_workers`` actors of ``pool``; never raises for a task.

    A dead actor's task goes back to the queue and a replacement is started without waiting for
    it: the surviving actors keep taking tasks, so losing a node whose resources do not come back
    slows the run down instead of stalling it; a replacement that never gets placed is dropped at
    the end."""
    report = PoolReport()
    queue = deque(tasks)
    attempts: dict[str, int] = {}
    in_flight: dict[Any, tuple[Any, ShardTask]] = {}
    starting: dict[Any, Any] = {}  # describe() future -> replacement actor
    idle: list[Any] = []  # live actors with nothing to do (they take re-queued tasks)
    failed_starts = 0

    def submit(worker: Any) -> None:
        if queue:
            task = queue.popleft()
            in_flight[worker.run.remote(*task.args)] = (worker, task)
        else:
            idle.append(worker)

    total = sum(task.units for task in tasks)
    try:
        with Progress(desc, unit, total, tasks=len(tasks)) as progress:
            for _ in range(min(n_workers, len(tasks))):  # started together
                worker, describe = pool.launch()
                starting[describe] = worker
            # the first workers load (or fail) together before work is dealt, so it spreads over all of
            # them; one the cluster cannot place (too few nodes left) is not waited for beyond the
            # time the first needed, and joins later if it ever starts
            began = time.monotonic()
            _, late = ray.wait(list(starting), num_returns=1)
            if late:
                ray.wait(late, num_returns=len(late), timeout=max(10.0, 2 * (time.monotonic() - began)))
            first_ready = True
            while in_flight or (queue and starting):
                ready, _ = ray.wait([*in_flight, *starting], num_returns=1)
                if ready[0] in starting:
                    worker = starting.pop(ready[0])
                    try:
                        pool.ready(worker, ready[0])
                    except RuntimeError as exc:
                        failed_starts += 1
                        if failed_starts >= max_attempts:
                            raise
                        log.warning("%s; starting another", exc)
                        replacement, describe = pool.launch()
                        starting[describe] = replacement
                        continue
                    if first_ready:
                        progress.restart_clock()  # rates count work, not start-up
                        first_ready = False
                    submit(worker)
                    continue
                worker, task = in_flight.pop(ready[0])
                try:
                    marker = ray.get(ready[0])
                except (RayActorError, RayTaskError) as exc:
                    refused = storage_error(getattr(exc, "cause", None))
                    if refused is not None:  # the same storage refuses every worker: stop now
                        raise refused from None
                    attempts[task.name] = attempts.get(task.name, 0) + 1
                    why = reason(exc)
                    if attempts[task.name] < max_attempts:
                        log.warning("%s failed (attempt %d): %s; retrying", task.name, attempts[task.name], why)
                        queue.appendleft(task)
                    else:
                        log.error("%s failed %d times, giving up for this run: %s", task.name, attempts[task.name], why)
                        report.failed[task.name] = why
                    if isinstance(exc, RayActorError):
                        pool.discard(worker)
                        replacement, describe = pool.launch()
                        starting[describe] = replacement
                    else:
                        submit(worker)
                    while queue and idle:
                        submit(idle.pop())
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
