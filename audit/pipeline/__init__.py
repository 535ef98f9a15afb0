"""The Ray wiring: the one package that knows about Ray (docs/architecture.md, "Layers"). Stages stay Ray-free.

Names are imported on first use, so an actor whose class lives in a light module (the index
shard actors of the kNN join) does not pull in torch and diffusers with the package.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AuditResult": "audit.pipeline.audit",
    "run_audit": "audit.pipeline.audit",
    "run_screen": "audit.pipeline.screening",
    "LOOPBACK": "audit.pipeline.ray_setup",
    "connect": "audit.pipeline.ray_setup",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'audit.pipeline' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
