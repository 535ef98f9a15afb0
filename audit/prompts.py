"""Prompt sources: plain text, JSONL and Parquet (LAION metadata).

Every source is read into the same shape: the prompt text and, where the source has them, the
LAION ``key`` and ``url`` columns, plus the row the prompt came from. Blank prompts are skipped and
counted; malformed rows are errors that name the file and line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class RawPrompts:
    """Prompts as read from a source, in source order, before de-duplication."""

    source: str
    prompts: list[str] = field(default_factory=list)
    source_rows: list[int] = field(default_factory=list)
    carried: dict[str, list[str | None]] = field(default_factory=dict)
    skipped_blank: int = 0

    def add(self, text: object, row: int, extra: dict[str, object] | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            self.skipped_blank += 1
            return
        self.prompts.append(text)
        self.source_rows.append(row)
        for column, values in self.carried.items():
            value = (extra or {}).get(column)
            values.append(None if value is None else str(value))


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
    if not raw.prompts:
        raise InputError(f"prompts.source: {path} contains no prompts (is the file empty?)")
    return raw


def _decoded_lines(path: Path) -> list[tuple[int, str]]:
    lines = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                    "re-encode the file as UTF-8"
                ) from None
            lines.append((number, text.lstrip("\ufeff") if number == 1 else text))
    return lines


def _read_txt(path: Path, _text_column: str) -> RawPrompts:
    raw = RawPrompts(source=str(path))
    for number, line in _decoded_lines(path):
        raw.add(line.rstrip("\r\n"), number)
    return raw


def _read_jsonl(path: Path, text_column: str) -> RawPrompts:
    raw = RawPrompts(source=str(path), carried={c: [] for c in CARRIED_COLUMNS})
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
    return raw


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
    carried = [c for c in CARRIED_COLUMNS if c in names and c != text_column]
    raw = RawPrompts(source=str(path), carried={c: [] for c in carried})
    row = 0
    for batch in dataset.to_batches(columns=[text_column, *carried]):
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for i, text in enumerate(columns[text_column]):
            raw.add(text, row, {c: columns[c][i] for c in carried})
            row += 1
    return raw


def _read_most_duplicated(path: Path, _text_column: str) -> RawPrompts:
    """Carlini et al.'s prompt selection: reference captions, most duplicated images first
    (``prompts.limit`` keeps the N most duplicated distinct captions)."""
    table = most_duplicated(path)
    raw = RawPrompts(source=f"{path} (most duplicated)", carried={c: [] for c in CARRIED_COLUMNS})
    columns = table.select(["caption", "key", "url", "row"]).to_pydict()
    for caption, key, url, row in zip(columns["caption"], columns["key"], columns["url"], columns["row"]):
        raw.add(caption, int(row), {"key": key, "url": url})
    return raw


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
