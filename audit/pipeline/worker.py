"""The one Ray actor that runs shard steps: any :class:`audit.step.ShardStep`, built once per worker."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

from audit.step import StepSpec


@ray.remote(max_restarts=0)
class StepWorker:
    """Builds its step from ``spec`` (models load here, once) and runs shard tasks on it."""

    def __init__(self, spec: StepSpec) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.step = spec.build()

    def describe(self) -> dict[str, Any]:
        """Where the worker runs and what it loaded (ready once the actor is placed and built)."""
        return {"host": socket.gethostname(), "process_id": os.getpid(), **self.step.describe()}

    def run(self, payload: Any) -> dict[str, Any]:
        return self.step.run(payload)
