"""Reading a run's tables for reports: complete shards only, as pyarrow tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit import layout
from audit.errors import InputError
from audit.schema import ESCALATION
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


def complete_table(store: RunStore, table: str, columns: list[str] | None = None,
                   sample_ids: list[str] | None = None) -> pa.Table | None:
    """The rows of every complete shard of ``table`` (None when it has none); optionally only
    some columns and only the rows of some samples."""
    folder = store.table_dir(table)
    names = sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []
    parts = []
    for name in names:
        if not store.is_complete(table, name):
            continue
        part = pq.read_table(store.shard_path(table, name), columns=columns)
        if sample_ids is not None:
            part = part.filter(pc.is_in(part.column("sample_id"), pa.array(sample_ids, pa.string())))
        parts.append(part)
    return pa.concat_tables(parts) if parts else None


def require(store: RunStore, table: str, columns: list[str] | None = None) -> pa.Table:
    found = complete_table(store, table, columns)
    if found is None:
        raise InputError(f"{store.path}: no complete {table}/ shards; run `memaudit run` on its config "
                         "first (it resumes where it stopped)")
    return found


SAMPLE_STATUS_COLUMNS = ["sample_id", "prompt_id", "status"]


def run_samples(store: RunStore, screened: bool) -> pa.Table:
    """Every sample's id, prompt and status. A screened run may have no samples shard at all (the
    screen escalated nothing): then an empty table; any other run must have some."""
    if not screened:
        return require(store, layout.SAMPLES, SAMPLE_STATUS_COLUMNS)
    found = complete_table(store, layout.SAMPLES, SAMPLE_STATUS_COLUMNS)
    return found if found is not None else pa.table({name: pa.array([], pa.string()) for name in SAMPLE_STATUS_COLUMNS})


def prompt_texts(store: RunStore) -> dict[str, str]:
    """prompt_id -> prompt text of the run's planned prompts."""
    prompts = pq.read_table(store.table_dir(layout.PROMPTS), columns=["prompt_id", "prompt"]).to_pydict()
    return dict(zip(prompts["prompt_id"], prompts["prompt"]))


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


def escalation_table(store: RunStore) -> pa.Table | None:
    """The screen's decisions (``escalation/escalation.parquet``); None for a run without a screen
    (or one whose screen has not decided yet). ``read_run`` has mirrored an object-store run's
    files already, so a missing file means no screen."""
    path = store.path / layout.escalation_file()
    return pq.read_table(path).cast(ESCALATION) if path.is_file() else None
