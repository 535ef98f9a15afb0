"""Progress of long commands: a tqdm bar (items done, rate, ETA) on a terminal, and throttled log
lines where no bar is shown (Ray job logs, CI)."""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


class Progress:
    """``with Progress("join", "query", total) as p: p.update(n)``; ``tasks`` counts shards when
    the work comes in shards (the log line then shows both)."""

    def __init__(self, desc: str, unit: str, total: int, tasks: int | None = None, every_s: float = 10.0) -> None:
        self.desc, self.unit, self.total, self.tasks, self.every_s = desc, unit, total, tasks, every_s
        self.done = self.tasks_done = 0
        self.start = self.last = time.time()
        self._redirect: Any = None
        self.bar: tqdm | None = None

    def __enter__(self) -> Progress:
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self.bar = tqdm(total=self.total, unit=self.unit, desc=self.desc, disable=None)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.__exit__(kind, exc, tb)

    def restart_clock(self) -> None:
        """Rates count work from now (not start-up)."""
        self.start = self.last = time.time()

    def update(self, units: int, tasks: int = 1) -> None:
        self.done += units
        self.tasks_done += tasks
        if self.bar is not None:
            self.bar.update(units)
        now = time.time()
        finished = self.done >= self.total or (self.tasks is not None and self.tasks_done >= self.tasks)
        if (self.bar is not None and not self.bar.disable) or (now - self.last < self.every_s and not finished):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        shards = f"{self.tasks_done}/{self.tasks} shards, " if self.tasks is not None else ""
        log.info("%s: %s%d/%d %s, %.2f %s/s, ETA %.0f s", self.desc, shards, self.done, self.total, self.unit,
                 rate, self.unit, eta)
