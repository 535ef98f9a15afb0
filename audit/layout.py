"""The run folder's layout: every table's name and where its files and markers live.

The one place these names are written (docs/architecture.md, "Contracts"; columns in
docs/schema.md). Writers, readers, ``memaudit verify``, the report and the analyst notebook all
take them from here.

``<root>/model=<name>/checkpoint=<id>/run=<run_id>/`` holds ``run.json`` and one folder per table;
a sharded table holds ``shard-NNNNN.parquet`` files and ``_markers/shard-NNNNN.json``.
"""

from __future__ import annotations

from audit.files import MARKERS

RUN_JSON = "run.json"
THRESHOLDS_JSON = "thresholds.json"  # the detection thresholds applied and their source (written by detection)

PROMPTS = "prompts"  # the planned prompts: one file, PROMPTS_FILE
SAMPLES = "samples"  # generated images, one shard per prompt shard
EMBEDDINGS = "embeddings"  # one embedding per sample, row-aligned with samples/
NEIGHBORS = "neighbors"  # each sample's top-k reference neighbors (kNN join)
MATCHES = "matches"  # verified (sample, reference image) pairs with their label
SCREEN = "screen"  # one row per prompt: the screen's signals (docs/screening.md)
ESCALATION = "escalation"  # one file, ESCALATION_FILE: each prompt's screen_score and whether it was escalated
ROUNDS = "rounds"  # adaptive runs: rounds/round-<k>.parquet, each prompt's decision after round k
PROMPT_SCORES = "prompt_scores"  # one row per prompt: signals, score, flag (written last per shard)
REPORT = "report"  # `memaudit report`'s pages, plots and summary.json
COMPARE = "compare"  # `memaudit compare A B`'s pages, in run B

PROMPTS_FILE = "prompts.parquet"
ESCALATION_FILE = "escalation.parquet"
DUPS_DIR = "dups"  # in a reference folder: dups/dups_{i}.parquet, near-duplicate counts aligned with metadata/
SHARDED_TABLES = (SCREEN, SAMPLES, EMBEDDINGS, NEIGHBORS, MATCHES, PROMPT_SCORES)
DERIVED_TABLES = (EMBEDDINGS, NEIGHBORS, MATCHES, PROMPT_SCORES)  # computed from samples/, shard by shard


def run_folder_parts(model_name: str, checkpoint_id: str, run_id: str) -> tuple[str, str, str]:
    """Hive-style folder names, so DuckDB/Polars glob many runs and get the keys as columns."""
    return f"model={model_name}", f"checkpoint={checkpoint_id}", f"run={run_id}"


def shard_file(table: str, shard: str) -> str:
    """A shard's Parquet file, relative to the run folder."""
    return f"{table}/{shard}.parquet"


def marker_file(table: str, shard: str) -> str:
    """A shard's completion marker, relative to the run folder."""
    return f"{table}/{MARKERS}/{shard}.json"


def prompts_file() -> str:
    """The planned prompts' table, relative to the run folder."""
    return f"{PROMPTS}/{PROMPTS_FILE}"


def escalation_file() -> str:
    """The screen's decisions, relative to the run folder."""
    return f"{ESCALATION}/{ESCALATION_FILE}"


def round_file_name(round_index: int) -> str:
    """The file in ``rounds/`` holding the decisions taken after one round of an adaptive run."""
    return f"round-{round_index}.parquet"


def round_file(round_index: int) -> str:
    """The same, relative to the run folder."""
    return f"{ROUNDS}/{round_file_name(round_index)}"
