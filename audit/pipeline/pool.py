"""Running shard tasks on a pool of step workers, with retries and progress.

Each worker builds its step once (models load in ``__init__``) and writes whole shards itself
(temporary file, rename, marker), so bulk data never passes through the driver, which only holds
task names and the small completion markers the workers return. A worker that dies is replaced and
its task retried; a task that keeps failing is reported in :attr:`StepReport.shards_failed` and
left for the next run to redo. A write the storage refuses (disk full, read-only) stops the stage
at once with a clear error (raised), as do a lost lease on the run (:mod:`audit.lease`) and a
worker that cannot start ``max_attempts`` times.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from audit.errors import storage_error
from audit.lease import LeaseLost
from audit.pipeline.worker import StepWorker
from audit.progress import Progress
from audit.step import ShardTask, StepReport, StepSpec

log = logging.getLogger(__name__)


def reason(exc: BaseException) -> str:
    """The last line of a Ray error's cause: what a user needs to read."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


class WorkerPool:
    """Step workers of one spec, started on demand and replaced when they die."""

    def __init__(self, spec: StepSpec, resources: dict[str, float], what: str) -> None:
        self.spec, self.resources, self.what = spec, resources, what
        self.workers: list[Any] = []

    def launch(self) -> tuple[Any, Any]:
        """A new worker and the future of its ``describe()`` (ready when it is placed and built)."""
        worker = StepWorker.options(**self.resources).remote(self.spec)
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


class _Scheduler:
    """Deals tasks to workers as they become free; one handler per event (a worker started, a
    task finished, a task failed)."""

    def __init__(self, pool: WorkerPool, tasks: list[ShardTask], max_attempts: int, progress: Progress) -> None:
        self.pool, self.max_attempts, self.progress = pool, max_attempts, progress
        self.queue = deque(tasks)
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[Any, tuple[Any, ShardTask]] = {}
        self.starting: dict[Any, Any] = {}  # describe() future -> worker
        self.idle: list[Any] = []  # live workers with nothing to do (they take re-queued tasks)
        self.failed_starts = 0
        self.first_ready = True
        self.markers: list[dict[str, Any]] = []
        self.failed: dict[str, str] = {}

    def start(self, n_workers: int) -> None:
        """Start the first workers together and let them load (or fail) before work is dealt, so it
        spreads over all of them; one the cluster cannot place (too few nodes left) is not waited
        for beyond the time the first needed, and joins later if it ever starts."""
        for _ in range(n_workers):
            self._launch()
        began = time.monotonic()
        _, late = ray.wait(list(self.starting), num_returns=1)
        if late:
            ray.wait(late, num_returns=len(late), timeout=max(10.0, 2 * (time.monotonic() - began)))

    def run(self) -> None:
        while self.in_flight or (self.queue and self.starting):
            ready = ray.wait([*self.in_flight, *self.starting], num_returns=1)[0][0]
            if ready in self.starting:
                self._on_started(ready)
                continue
            worker, task = self.in_flight.pop(ready)
            try:
                marker = ray.get(ready)
            except (RayActorError, RayTaskError) as exc:
                self._on_failed(worker, task, exc)
                continue
            self._on_finished(worker, task, marker)

    def _launch(self) -> None:
        worker, describe = self.pool.launch()
        self.starting[describe] = worker

    def _submit(self, worker: Any) -> None:
        if self.queue:
            task = self.queue.popleft()
            self.in_flight[worker.run.remote(task.payload)] = (worker, task)
        else:
            self.idle.append(worker)

    def _on_started(self, describe: Any) -> None:
        worker = self.starting.pop(describe)
        try:
            self.pool.ready(worker, describe)
        except RuntimeError as exc:
            self.failed_starts += 1
            if self.failed_starts >= self.max_attempts:
                raise
            log.warning("%s; starting another", exc)
            self._launch()
            return
        if self.first_ready:
            self.progress.restart_clock()  # rates count work, not start-up
            self.first_ready = False
        self._submit(worker)

    def _on_finished(self, worker: Any, task: ShardTask, marker: dict[str, Any]) -> None:
        self.markers.append(marker)
        self.progress.update(task.units)
        self._submit(worker)

    def _on_failed(self, worker: Any, task: ShardTask, exc: RayActorError | RayTaskError) -> None:
        cause = getattr(exc, "cause", None)
        refused = storage_error(cause)
        if refused is not None:  # the same storage refuses every worker: stop now
            raise refused from None
        if isinstance(cause, LeaseLost):  # another driver owns the run now: publish nothing more
            raise LeaseLost(str(cause)) from None
        self.attempts[task.name] = self.attempts.get(task.name, 0) + 1
        why = reason(exc)
        if self.attempts[task.name] < self.max_attempts:
            log.warning("%s failed (attempt %d): %s; retrying", task.name, self.attempts[task.name], why)
            self.queue.appendleft(task)
        else:
            log.error("%s failed %d times, giving up for this run: %s", task.name, self.attempts[task.name], why)
            self.failed[task.name] = why
        if isinstance(exc, RayActorError):  # replaced without waiting: the others keep taking tasks
            self.pool.discard(worker)
            self._launch()
        else:
            self._submit(worker)
        while self.queue and self.idle:
            self._submit(self.idle.pop())


def run_tasks(pool: WorkerPool, n_workers: int, tasks: list[ShardTask], max_attempts: int,
              unit: str, desc: str) -> StepReport:
    """Run every task on at most ``n_workers`` workers of ``pool``; returns the markers counted in
    a :class:`StepReport` (``shards_failed``: tasks that failed ``max_attempts`` times)."""
    report = StepReport()
    try:
        with Progress(desc, unit, sum(task.units for task in tasks), tasks=len(tasks)) as progress:
            scheduler = _Scheduler(pool, tasks, max_attempts, progress)
            scheduler.start(min(n_workers, len(tasks)))
            scheduler.run()
    finally:
        pool.shutdown()
    for marker in scheduler.markers:
        report.add(marker)
    report.shards_failed = scheduler.failed
    report.add_busy_window(scheduler.markers)
    return report
