"""Prompt sources: plain text, JSONL and Parquet (LAION metadata).

Every source is read into the same shape: the prompt text and, where the source has them, the
LAION ``key`` and ``url`` columns, plus the row the prompt came from. Blank prompts are skipped and
counted; malformed rows are errors that name the file and line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from audit.config import PromptsSection
from audit.errors import InputError
from audit.layout import DUPS_DIR
from audit.location import Location
from audit.testbed.checkpoints import lora_testbed_folder, maps_testbed_folder, testbed_folder

log = logging.getLogger(__name__)

BUILTIN_SOURCES = {
    "default": Path(__file__).parent / "defaults" / "prompts.txt",
    "testbed": testbed_folder() / "audit_prompts.txt",
    "testbed-maps": maps_testbed_folder() / "audit_prompts.txt",
    "testbed-lora": lora_testbed_folder() / "audit_prompts.txt",
}
CARRIED_COLUMNS = ("key", "url")
_SUFFIX_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
CHUNK_ROWS = 1 << 16  # prompts per Arrow record batch while a source is read


@dataclass(frozen=True)
class RawPrompts:
    """Prompts as read from a source, in source order, before de-duplication: one Arrow table with
    ``prompt``, ``source_row`` and the carried LAION columns the source has (``key``, ``url``), in
    record batches of at most :data:`CHUNK_ROWS` rows, so that 10^7 prompts cost Arrow buffers, not
    Python objects (docs/architecture.md, "Scale")."""

    source: str
    table: pa.Table
    skipped_blank: int = 0

    @property
    def n_prompts(self) -> int:
        return self.table.num_rows

    @property
    def prompts(self) -> list[str]:
        """Every prompt as a Python list (small sources and tests; the planner reads :attr:`table`)."""
        return self.table.column("prompt").to_pylist()

    @property
    def source_rows(self) -> list[int]:
        return self.table.column("source_row").to_pylist()

    @property
    def carried(self) -> dict[str, list[str | None]]:
        """The carried columns the source has, as Python lists."""
        return {c: self.table.column(c).to_pylist() for c in CARRIED_COLUMNS if c in self.table.column_names}


class _Collector:
    """Collects a source's prompts, row by row or batch by batch, into Arrow record batches of at
    most :data:`CHUNK_ROWS` rows. A prompt is blank (skipped and counted) when it is not a string or
    ``str.strip`` leaves nothing; a carried value is kept as ``str(value)`` (None stays None)."""

    def __init__(self, source: str, carried: tuple[str, ...] = ()) -> None:
        self.source, self.carried = source, carried
        self.schema = pa.schema([("prompt", pa.string()), ("source_row", pa.int64()),
                                 *((c, pa.string()) for c in carried)])
        self.batches: list[pa.RecordBatch] = []
        self.skipped_blank = 0
        self._texts: list[str] = []
        self._rows: list[int] = []
        self._carried: dict[str, list[str | None]] = {c: [] for c in carried}

    def add(self, text: object, row: int, extra: dict[str, object] | None = None) -> None:
        """One row of a source read line by line."""
        if not isinstance(text, str) or not text.strip():
            self.skipped_blank += 1
            return
        self._texts.append(text)
        self._rows.append(row)
        if self.carried:
            values = extra or {}
            for column, kept in self._carried.items():
                kept.append(_text_or_none(values.get(column)))
        if len(self._texts) >= CHUNK_ROWS:
            self._flush()

    def add_batch(self, texts: pa.Array, rows: pa.Array, extra: dict[str, pa.Array]) -> None:
        """Rows of a columnar source: ``texts`` (string), their ``rows`` and carried columns."""
        self._flush()
        present = np.fromiter((_present(t) for t in texts.to_pylist()), bool, len(texts))
        self.skipped_blank += len(present) - int(present.sum())
        keep = pa.array(present)
        columns = [texts.cast(pa.string()).filter(keep), rows.cast(pa.int64()).filter(keep),
                   *(_as_text(extra[c]).filter(keep) for c in self.carried)]
        for start in range(0, len(columns[0]), CHUNK_ROWS):
            self.batches.append(pa.record_batch([c.slice(start, CHUNK_ROWS) for c in columns], schema=self.schema))

    def _flush(self) -> None:
        if self._texts:
            columns = [self._texts, self._rows, *self._carried.values()]
            self.batches.append(pa.record_batch([pa.array(c, f.type) for c, f in zip(columns, self.schema)],
                                                schema=self.schema))
            self._texts, self._rows, self._carried = [], [], {c: [] for c in self.carried}

    def result(self) -> RawPrompts:
        self._flush()
        return RawPrompts(self.source, pa.Table.from_batches(self.batches, schema=self.schema), self.skipped_blank)


def _present(text: object) -> bool:
    """Whether a source value is a prompt (a string with something besides whitespace)."""
    return isinstance(text, str) and bool(text.strip())


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _as_text(values: pa.Array) -> pa.Array:
    """A carried column as strings: text as it is, anything else as Python's ``str`` of it."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.cast(pa.string())
    return pa.array([_text_or_none(v) for v in values.to_pylist()], pa.string())


def resolve_source(section: PromptsSection) -> tuple[Path, str]:
    """The prompt file or folder and its format; errors say what is missing."""
    source = section.source
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            raise InputError(
                f"prompts.source: unknown built-in prompt set {name!r}; "
                f"available: {', '.join('builtin:' + n for n in BUILTIN_SOURCES)}"
            )
        return BUILTIN_SOURCES[name], "txt"
    path = Location.of(source).materialize("prompts.source")  # a URI: an object or a prefix, mirrored here
    if not path.exists():
        raise InputError(f"prompts.source: {path} does not exist (give a .txt, .jsonl or .parquet file)")
    fmt = section.format
    if fmt == "auto":
        fmt = "parquet" if path.is_dir() else _SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise InputError(
                f"prompts.source: cannot tell the format of {path} from its suffix; "
                "set prompts.format to txt, jsonl or parquet"
            )
    if path.is_dir() and fmt not in {"parquet", "most_duplicated"}:
        raise InputError(f"prompts.source: {path} is a folder; only parquet sources may be folders")
    if fmt == "most_duplicated" and not path.is_dir():
        raise InputError(f"prompts.source: {path} is not a reference folder (format most_duplicated reads "
                         "<folder>/dups/ written by `memaudit reference dups`)")
    return path, fmt


def read_prompts(section: PromptsSection) -> RawPrompts:
    """Read every prompt of the configured source."""
    path, fmt = resolve_source(section)
    readers = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet,
               "most_duplicated": _read_most_duplicated}
    raw = readers[fmt](path, section.text_column)
    if raw.skipped_blank:
        log.warning("%s: skipped %d blank prompts", path, raw.skipped_blank)
    if not raw.n_prompts:
        raise InputError(f"prompts.source: {path} contains no prompts (is the file empty?)")
    return raw


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, the first line's byte-order mark dropped."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                    "re-encode the file as UTF-8"
                ) from None
            yield number, text.lstrip("\ufeff") if number == 1 else text


def _read_txt(path: Path, _text_column: str) -> RawPrompts:
    raw = _Collector(str(path))
    for number, line in _decoded_lines(path):
        raw.add(line.rstrip("\r\n"), number)
    return raw.result()


def _read_jsonl(path: Path, text_column: str) -> RawPrompts:
    raw = _Collector(str(path), CARRIED_COLUMNS)
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        if text_column not in record:
            raise InputError(
                f"{path}:{number}: no {text_column!r} field (fields: {', '.join(map(str, record)) or 'none'}); "
                "set prompts.text_column"
            )
        raw.add(record[text_column], number, record)
    return raw.result()


def _read_parquet(path: Path, text_column: str) -> RawPrompts:
    try:
        dataset = ds.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not readable as Parquet ({exc})") from None
    names = dataset.schema.names
    if text_column not in names:
        raise InputError(
            f"{path}: no column {text_column!r} (columns: {', '.join(names)}); set prompts.text_column"
        )
    if not pa.types.is_string(dataset.schema.field(text_column).type) and not pa.types.is_large_string(
        dataset.schema.field(text_column).type
    ):
        raise InputError(f"{path}: column {text_column!r} holds {dataset.schema.field(text_column).type}, not text")
    carried = tuple(c for c in CARRIED_COLUMNS if c in names and c != text_column)
    raw = _Collector(str(path), carried)
    row = 0
    for batch in dataset.to_batches(columns=[text_column, *carried]):
        rows = pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64))
        raw.add_batch(batch.column(text_column), rows, {c: batch.column(c) for c in carried})
        row += batch.num_rows
    return raw.result()


def _read_most_duplicated(path: Path, _text_column: str) -> RawPrompts:
    """Carlini et al.'s prompt selection: reference captions, most duplicated images first
    (``prompts.limit`` keeps the N most duplicated distinct captions)."""
    table = most_duplicated(path)
    raw = _Collector(f"{path} (most duplicated)", CARRIED_COLUMNS)
    for batch in table.select(["caption", "key", "url", "row"]).to_batches(max_chunksize=CHUNK_ROWS):
        raw.add_batch(batch.column("caption"), batch.column("row"), {"key": batch.column("key"), "url": batch.column("url")})
    return raw.result()


def most_duplicated(root: Path) -> pa.Table:
    """Every row of a reference folder with its caption, key, url and dup_count, most duplicated
    first (ties by row), excluded rows left out: Carlini et al.'s prompt selection order (the
    counts are written by `memaudit reference dups`)."""
    folder = root / DUPS_DIR
    files = sorted(folder.glob("dups_*.parquet")) if folder.is_dir() else []
    if not files:
        raise InputError(f"{root}: no {DUPS_DIR}/ counts; run `memaudit reference dups {root}` first")
    table = pa.concat_tables([pq.read_table(p) for p in files])
    table = table.filter(pc.greater_equal(table["dup_count"], 0))
    return table.sort_by([("dup_count", "descending"), ("row", "ascending")])
