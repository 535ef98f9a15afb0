"""The shard-step protocol: how every shard-producing step looks to the Ray layer.

A step (generate, embed samples, kNN join, detect, embed reference shards) is a Ray-free object
built **once per worker** from a :class:`StepSpec` (its class and settings, both picklable), which
loads its models in ``__init__``; :meth:`ShardStep.run` then runs **one shard task** to its
completion marker, writing the shard itself, so bulk data never passes through the driver. One
generic worker (:mod:`audit.pipeline.worker`) runs any step; :class:`StepReport` is what one
invocation of a step did. See docs/architecture.md, "The shard-step protocol".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from audit.schema import STATUS_ERROR, STATUS_OK


class ShardStep(Protocol):
    """A Ray-free step: built once per worker, it runs shard tasks one at a time."""

    def describe(self) -> dict[str, Any]:
        """What the worker loaded (device, model id, …), for the log when it is ready."""
        ...

    def run(self, task: Any) -> dict[str, Any]:
        """Publish one shard (file, then marker) and return its completion marker."""
        ...


@dataclass(frozen=True)
class StepSpec:
    """How a worker builds its step: ``prepare()`` first when given (e.g. make the reference
    folder ready on this node), then ``step_class(**settings)``."""

    step_class: type
    settings: dict[str, Any]
    prepare: Callable[[], object] | None = None

    def build(self) -> ShardStep:
        if self.prepare is not None:
            self.prepare()
        return self.step_class(**self.settings)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: ``step.run(payload)`` publishes one shard and returns its marker."""

    name: str
    payload: Any
    units: int  # items it produces, for progress


@dataclass
class StepReport:
    """What one invocation of a step did to the table it writes, shard by shard."""

    shards_total: int = 0
    shards_skipped: int = 0  # complete and current already
    shards_written: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)  # task name -> why (left for the next run)
    rows_ok: int = 0
    rows_error: int = 0
    first_errors: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # what a step counts besides rows
    busy_s: float = 0.0  # first shard start to last shard end, on the workers
    seconds: float = 0.0  # the whole invocation, on the driver
    markers: list[dict[str, Any]] = field(default_factory=list, repr=False)  # of the shards written

    @property
    def rows_written(self) -> int:
        return self.rows_ok + self.rows_error

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.busy_s if self.busy_s else 0.0

    def add(self, marker: dict[str, Any]) -> None:
        """Count one shard's completion marker."""
        counts = marker.get("status_counts", {})
        errors = int(counts.get(STATUS_ERROR, 0))
        self.shards_written += 1
        self.markers.append(marker)
        self.rows_ok += int(counts.get(STATUS_OK, 0))
        self.rows_error += errors
        if errors and len(self.first_errors) < 3:
            self.first_errors.append(f"{marker.get('shard')}: {errors} failed, e.g. {marker.get('first_error')}")

    def merged(self, other: StepReport) -> StepReport:
        """This report and ``other`` (a later invocation of the same step, e.g. the next round)
        added up; busy time and seconds add, so throughput stays rows over time spent."""
        return StepReport(
            shards_total=self.shards_total + other.shards_total, shards_skipped=self.shards_skipped + other.shards_skipped,
            shards_written=self.shards_written + other.shards_written,
            shards_failed={**self.shards_failed, **other.shards_failed}, rows_ok=self.rows_ok + other.rows_ok,
            rows_error=self.rows_error + other.rows_error, first_errors=(self.first_errors + other.first_errors)[:3],
            counts=self.counts + other.counts, busy_s=self.busy_s + other.busy_s, seconds=self.seconds + other.seconds,
            markers=self.markers + other.markers)

    def add_busy_window(self, markers: list[dict[str, Any]]) -> None:
        starts = [float(m.get("started_at", 0)) for m in markers]
        ends = [float(m.get("finished_at", 0)) for m in markers]
        if starts:
            self.busy_s = max(ends) - min(starts)
