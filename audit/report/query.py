"""DuckDB over one run's complete shards: what the report and the comparison read
(docs/architecture.md, "Reports at scale").

Each sharded table is a view over the files of its complete shards (the marker's size checked,
as every reader does), so aggregates run inside DuckDB under a memory limit — spilling to a
temporary folder past it — and only their results, a plot's numbers or a page's rows, come back
to Python. Nothing here builds a Python object per sample or per prompt.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from audit import layout, schema
from audit.errors import InputError
from audit.store import RunStore

MEMORY_LIMIT = "256MB"  # DuckDB's buffer; past it, joins and aggregates spill to disk
THREADS = 2

TABLE_SCHEMAS = {layout.SAMPLES: schema.SAMPLES, layout.NEIGHBORS: schema.NEIGHBORS, layout.MATCHES: schema.MATCHES,
                 layout.PROMPT_SCORES: schema.PROMPT_SCORES}


def complete_files(store: RunStore, table: str) -> tuple[list[Path], bool]:
    """The files of a table's complete shards, in shard order, and whether they are all of its
    files (then a reader may glob the folder)."""
    folder = store.table_dir(table)
    names = sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []
    # One thread: marker reads are small and hold the GIL; 10⁴ take 0.25 s, twice that on 4 threads.
    complete = [store.shard_path(table, n) for n in names if store.is_complete(table, n)]
    return complete, len(complete) == len(names)


def connect(memory_limit: str = MEMORY_LIMIT, threads: int = THREADS) -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB with bounded memory and threads, spilling to a temporary folder."""
    spill = Path(tempfile.gettempdir()) / "memaudit-duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    # Each shard file is read once per query: DuckDB's cache of file blocks only adds to the peak.
    return duckdb.connect(config={"memory_limit": memory_limit, "threads": threads, "temp_directory": str(spill),
                                  "preserve_insertion_order": False, "enable_external_file_cache": False})


class RunQuery:
    """Views ``samples``, ``neighbors``, ``matches``, ``prompt_scores``, ``prompts`` and
    ``escalation`` over one run (``escalation`` empty for a run without a screen), each named
    ``prefix`` + table (two runs share one connection in a comparison)."""

    def __init__(self, store: RunStore, con: duckdb.DuckDBPyConnection | None = None, prefix: str = "") -> None:
        self.store = store
        self.con = con if con is not None else connect()
        self.prefix = prefix
        self.counts: dict[str, int] = {}
        self.files: dict[str, list[Path]] = {}  # each table's complete files
        for table in (layout.SAMPLES, layout.NEIGHBORS, layout.MATCHES, layout.PROMPT_SCORES):
            self._view(table, *complete_files(store, table))
        self._single(layout.PROMPTS, store.path / layout.prompts_file())
        self.screened = (store.path / layout.escalation_file()).is_file()  # else an empty escalation view
        if self.screened:
            self._single(layout.ESCALATION, store.path / layout.escalation_file())
        else:
            self._empty(layout.ESCALATION, schema.ESCALATION)

    def name(self, table: str) -> str:
        return f"{self.prefix}{table}"

    def has(self, table: str) -> bool:
        """Whether the table has a complete shard."""
        return self.counts.get(table, 0) > 0

    def require_results(self) -> None:
        """Refuse a run with nothing to report: no complete prompt_scores/ shard, or (a run
        without a screen, which may escalate nothing) no complete samples/ shard."""
        for table in (layout.PROMPT_SCORES, *(() if self.screened else (layout.SAMPLES,))):
            if not self.has(table):
                raise InputError(f"{self.store.path}: no complete {table}/ shards; run `memaudit run` on its config "
                                 "first (it resumes where it stopped)")

    def _view(self, table: str, files: list[Path], every: bool) -> None:
        """A view over ``files``; a glob of the folder when they are all its files (DuckDB binds a
        list of 10⁴ files with about 100 MB more memory than their glob)."""
        self.counts[table], self.files[table] = len(files), files
        if files:  # file and row numbers give a table's row order (ties broken as a shard-by-shard read would)
            listed = _literal(str(self.store.table_dir(table) / "*.parquet")) if every else \
                "[" + ", ".join(_literal(str(f)) for f in files) + "]"
            self.con.execute(f"create or replace view {self.name(table)} as select * from read_parquet({listed}, "
                             "filename = true, file_row_number = true)")
        else:
            self._empty(table, TABLE_SCHEMAS[table])

    def _empty(self, table: str, columns: pa.Schema) -> None:
        empty = columns.empty_table().append_column("filename", pa.array([], pa.string())).append_column(
            "file_row_number", pa.array([], pa.int64()))
        self.con.register(f"{self.name(table)}_empty", empty)
        self.con.execute(f"create or replace view {self.name(table)} as select * from {self.name(table)}_empty")

    def _single(self, table: str, path: Path) -> None:
        self.con.execute(f"create or replace view {self.name(table)} as select * from read_parquet({_literal(str(path))})")

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """``query`` with ``{samples}``-style placeholders replaced by this run's view names."""
        names = {t: self.name(t) for t in (*TABLE_SCHEMAS, layout.PROMPTS, layout.ESCALATION)}
        return self.con.sql(query.format(**names), params=params)

    def of_shards(self, table: str, shards: set[str]) -> str | None:
        """SQL reading only the complete files of ``table`` for the given plan shards (their rounds
        included), e.g. a few samples shards' images; None when there are none."""
        return _read([f for f in self.files.get(table, []) if f.stem in shards or f.stem.rsplit("-r", 1)[0] in shards])

    def every_nth_file(self, table: str, every: int) -> str | None:
        """SQL reading every ``every``-th complete file of ``table`` (a plot's sample of whole
        shards, the same ones on every call); None when there are none."""
        return _read(self.files.get(table, [])[::every])

    def rows(self, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        return self.sql(query, params).fetchall()

    def one(self, query: str, params: list[Any] | None = None) -> tuple[Any, ...]:
        """The single row of an aggregate."""
        return self.rows(query, params)[0]

    def arrow(self, query: str, params: list[Any] | None = None) -> pa.Table:
        return self.sql(query, params).to_arrow_table()

    def numpy(self, query: str, params: list[Any] | None = None) -> dict[str, np.ndarray]:
        """The result's columns as NumPy arrays (nulls as NaN for numbers)."""
        table = self.arrow(query, params)
        return {name: _as_numpy(table.column(name)) for name in table.column_names}


def _as_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.float64) if column.null_count else column.to_numpy()
    if pa.types.is_boolean(column.type):
        return column.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    return column.to_numpy(zero_copy_only=False)


def _read(files: list[Path]) -> str | None:
    """A FROM source of ``files`` for :meth:`RunQuery.sql` (braces doubled: it formats the query)."""
    if not files:
        return None
    return ("read_parquet([" + ", ".join(_literal(str(f)) for f in files) + "])").replace("{", "{{").replace("}", "}}")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
