"""Driving a stage over many rows in fixed-size batches, with CPU work off the critical path."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class TwoPhaseStage(Protocol):
    """A stage whose accelerator phase (``generate``) and CPU phase (``encode``) can overlap."""

    def generate(self, batch: Batch) -> Any: ...

    def encode(self, batch: Batch, intermediate: Any) -> Batch: ...


def batches(rows: Batch, batch_size: int) -> list[Batch]:
    """Consecutive slices of ``batch_size`` rows (the last one may be shorter)."""
    n = len(next(iter(rows.values()))) if rows else 0
    return [{k: v[i : i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


def run_batches(
    stage: TwoPhaseStage | Callable[[Batch], Batch],
    rows: Batch,
    sink: Callable[[Batch], None],
    batch_size: int,
) -> None:
    """Feed ``rows`` through ``stage`` batch by batch and hand each output to ``sink``.

    For a two-phase stage, batch i+1's ``generate`` runs while a helper thread runs batch i's
    ``encode`` and ``sink`` (PNG encoding and Parquet writes release the GIL), so the accelerator
    does not wait for the CPU. At most two batches are in memory at once. Outputs reach ``sink``
    in row order; an exception in either phase propagates.
    """
    two_phase = hasattr(stage, "generate") and hasattr(stage, "encode")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memaudit-encode") as helper:
        pending: Future[None] | None = None
        for batch in batches(rows, batch_size):
            if two_phase:
                intermediate = stage.generate(batch)  # type: ignore[union-attr]
                task = _finish_two_phase(stage, batch, intermediate, sink)  # type: ignore[arg-type]
            else:
                output = stage(batch)  # type: ignore[operator]
                task = _finish_plain(output, sink)
            if pending is not None:
                pending.result()
            pending = helper.submit(task)
        if pending is not None:
            pending.result()


def _finish_two_phase(
    stage: TwoPhaseStage, batch: Batch, intermediate: Any, sink: Callable[[Batch], None]
) -> Callable[[], None]:
    return lambda: sink(stage.encode(batch, intermediate))


def _finish_plain(output: Batch, sink: Callable[[Batch], None]) -> Callable[[], None]:
    return lambda: sink(output)
