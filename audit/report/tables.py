"""Opening a run for reports: its store and run.json, and the thresholds its detection applied
(the tables themselves are read by DuckDB, :mod:`audit.report.query`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from audit import layout
from audit.errors import InputError
from audit.store import RunStore


def read_run(path: str | Path) -> tuple[RunStore, dict[str, Any]]:
    """The run's store and run.json (an object-store run mirrored here first); a clear error when
    ``path`` is not a run folder."""
    store = RunStore(path)
    store.sync()
    info = store.read_json()
    if info is None:
        raise InputError(f"{path}: not a run folder (no run.json); pass the folder `memaudit run` printed "
                         "(<root>/model=…/checkpoint=…/run=…)")
    return store, info


def run_thresholds(store: RunStore, info: dict[str, Any]) -> dict[str, Any]:
    """The thresholds detection applied (``thresholds.json``); for a run detected before it was
    recorded, the paper constants of its config, rates unknown."""
    recorded = store.read_json(layout.THRESHOLDS_JSON)
    if recorded is not None:
        return recorded
    det = info["config"]["detection"]
    return {"source": "paper", "match_l2": det["match_l2"], "template_similarity": det["template_similarity"],
            "clique_delta": det["clique_delta"], "low_information": False, "verbatim_rate": None,
            "template_rate": None, "pair_rate": None, "flag_fpr": None, "calibration": None}
