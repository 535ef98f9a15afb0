"""``memaudit verify RUN``: reconcile a run folder with its plan — every planned sample_id present
exactly once, nothing unplanned, every marker matching its file (size, sha256, rows), derived
tables aligned with the samples they were computed from, and no leftover temporary files.

It streams (docs/architecture.md, "Verify at scale"): the plan is read shard by shard
(:mod:`audit.reconcile_plan`), each samples shard's ids are compared with its planned ids as Arrow
arrays, and only the anomalies — samples outside their planned shard, missing or duplicated —
become Python objects, classified at the end with one more pass over the plan. Memory is one
shard plus the anomalies, whatever the run's size.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit import layout
from audit.errors import InputError
from audit.files import MARKERS, file_sha256, is_temporary
from audit.ids import shard_name
from audit.plan import round_ends
from audit.reconcile_plan import (
    PlanOrderError,
    PlanSettings,
    PlanShard,
    SampleRange,
    plan_shards,
    planned_shard_of,
    prompt_slices,
)
from audit.store import RunStore

ANOMALY_CAP = 1_000_000  # misplaced, missing or duplicated samples itemised before verify stops listing them
# threads reading and hashing shard files: one per core and one more for the waits (more only contend)
READERS = max(2, min(8, (os.cpu_count() or 1) + 1))
AHEAD = 8  # plan shards read ahead of the one being reconciled
WHOLE_READ = 16 * 2**20  # shard files up to this size are read into memory once (hash, then parse)


@dataclass
class Verification:
    planned_samples: int = 0
    present_samples: int = 0
    complete_shards: int = 0
    planned_shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "planned_samples": self.planned_samples, "present_samples": self.present_samples,
                "planned_shards": self.planned_shards, "complete_shards": self.complete_shards,
                "problems": self.problems, "notes": self.notes}


def verify_run(path: str | Path) -> Verification:
    store = RunStore(path)
    store.sync()  # an object-store run: its published shards are fetched and checked here
    info = store.read_json()
    if info is None:
        raise InputError(f"{path}: not a run folder (no run.json)")
    prompts_file = store.path / layout.prompts_file()
    if not prompts_file.is_file():
        raise InputError(f"{prompts_file}: missing; the run was never planned")
    generation = info["config"]["generation"]
    n_shards = int(info["prompts"]["n_shards"])
    result = Verification(planned_shards=n_shards)
    escalated = _check_screen(store, info, prompts_file, result)
    ends = round_ends(int(generation["samples_per_prompt"]), generation.get("max_samples_per_prompt"))
    settings = PlanSettings(n_shards, tuple(ends), escalated, _continued(store, len(ends)))
    reconciler = _Reconciler(store, result, settings)
    try:
        reconciler.run(plan_shards(prompts_file, settings))
    except PlanOrderError as exc:
        result.problems.append(f"prompts/: {exc}; it was not written by memaudit's planner")
        return result
    reconciler.finish(prompts_file)
    return result


def _continued(store: RunStore, n_rounds: int) -> tuple[pa.Array, ...]:
    """An adaptive run's recorded decisions (docs/screening.md, "Rounds"): per recorded round, the
    prompts sent on to the next one (up to the first round not decided yet)."""
    found = []
    for k in range(1, n_rounds):
        path = store.path / layout.round_file(k - 1)
        if not path.exists():
            break
        table = pq.read_table(path, columns=["prompt_id", "decision"])
        found.append(table.column("prompt_id").filter(pc.equal(table.column("decision"), "continue")).combine_chunks())
    return tuple(found)


class _Reconciler:
    """One streamed pass over the plan's shards, then the classification of the anomalies."""

    def __init__(self, store: RunStore, result: Verification, settings: PlanSettings) -> None:
        self.store, self.result, self.settings = store, result, settings
        self.derived = {t: _names_on_disk(store, t) for t in layout.DERIVED_TABLES}
        self.planned_names: set[str] = set()
        self.complete: set[str] = set()
        self.incomplete: list[str] = []
        self.with_samples = 0
        self.duplicated: set[str] = set()
        self.outside: list[tuple[str, str]] = []  # (sample_id, the shard it was found in)
        self.missing: dict[str, str] = {}  # sample_id -> its planned (complete) shard
        self.itemised = 0
        self.later = Verification()  # the derived tables' findings, listed after the samples' own

    def run(self, shards: Iterator[PlanShard]) -> None:
        """Every plan shard in order, its files read and hashed on threads a few shards ahead
        (hashing and Parquet reads release the GIL), its findings applied in plan order."""
        window: deque[tuple[PlanShard, dict[tuple[str, str], Future[ShardRead]]]] = deque()
        with ThreadPoolExecutor(READERS) as pool:
            for shard in shards:
                window.append((shard, self._submit(pool, shard)))
                if len(window) > AHEAD:
                    self.plan_shard(*window.popleft())
            while window:
                self.plan_shard(*window.popleft())

    def _submit(self, pool: ThreadPoolExecutor, shard: PlanShard) -> dict[tuple[str, str], Future[ShardRead]]:
        """Start reading the files of one plan shard: its samples shards and their derived shards."""
        wanted = []
        for k, planned in enumerate(shard.rounds):
            if k and not planned.n_samples:
                continue
            wanted += [(layout.SAMPLES, planned.name), (layout.EMBEDDINGS, planned.name),
                       (layout.NEIGHBORS, planned.name)]
        wanted += [(layout.MATCHES, shard.name), (layout.PROMPT_SCORES, shard.name)]
        reads = {}
        for table, name in wanted:
            if table == layout.SAMPLES or name in self.derived[table]:
                if table != layout.SAMPLES:
                    self.derived[table].discard(name)
                reads[(table, name)] = pool.submit(_read_shard, self.store, table, name)
        return reads

    def plan_shard(self, shard: PlanShard, reads: dict[tuple[str, str], Future[ShardRead]]) -> None:
        held: list[pa.Array] = []
        for k, planned in enumerate(shard.rounds):
            if k and not planned.n_samples:
                continue
            self.planned_names.add(planned.name)
            self.result.planned_samples += planned.n_samples
            self.with_samples += bool(planned.n_samples)
            ids = reads[(layout.SAMPLES, planned.name)].result().into(self.result)
            if ids is None:
                if planned.n_samples:
                    self.incomplete.append(planned.name)
                self._derived(reads, layout.EMBEDDINGS, planned.name, None)
                self._derived(reads, layout.NEIGHBORS, planned.name, None)
                continue
            self.complete.add(planned.name)
            self.result.complete_shards += 1
            self.result.present_samples += len(ids)
            self._compare(planned, ids)
            held.append(ids)
            self._derived(reads, layout.EMBEDDINGS, planned.name, ids)
            self._derived(reads, layout.NEIGHBORS, planned.name, ids)
        group = pa.concat_arrays(held) if held else None  # matches/ and prompt_scores/ cover every round
        self._derived(reads, layout.MATCHES, shard.name, group)
        self._derived(reads, layout.PROMPT_SCORES, shard.name, group)

    def _compare(self, planned: SampleRange, present: pa.Array) -> None:
        expected = planned.sample_ids()
        if present.equals(expected):
            return
        counts = pc.value_counts(present)
        twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        if self._itemise(len(twice)):
            self.duplicated.update(twice.to_pylist())
        outside = present.filter(pc.invert(pc.is_in(present, value_set=expected)))
        if self._itemise(len(outside)):
            self.outside += [(sid, planned.name) for sid in outside.to_pylist()]
        missing = expected.filter(pc.invert(pc.is_in(expected, value_set=present)))
        if self._itemise(len(missing)):
            self.missing.update(dict.fromkeys(missing.to_pylist(), planned.name))

    def _itemise(self, count: int) -> bool:
        """Whether ``count`` more anomalies can still be listed one by one."""
        if not count:
            return False
        self.itemised += count
        if self.itemised > ANOMALY_CAP:
            if self.itemised - count <= ANOMALY_CAP:
                self.result.problems.append(f"more than {ANOMALY_CAP:,} samples are misplaced, missing or "
                                            "duplicated: this folder does not hold this plan's run; verify stopped "
                                            "listing them (the counts below are incomplete)")
            return False
        return True

    def _derived(self, reads: dict[tuple[str, str], Future[ShardRead]], table: str, name: str,
                 samples: pa.Array | None) -> None:
        if (table, name) not in reads:
            return
        ids = reads[(table, name)].result().into(self.later)
        if ids is None or samples is None:
            return
        if table == layout.EMBEDDINGS and not ids.equals(samples):
            self.later.problems.append(f"embeddings/{name}: rows are not aligned with samples/{name}")
        elif table in (layout.NEIGHBORS, layout.MATCHES) and not _within(ids, samples):
            self.later.problems.append(f"{table}/{name}: rows for samples that samples/{name} does not hold")

    def finish(self, prompts_file: Path) -> None:
        result = self.result
        self._classify(prompts_file)
        if self.settings.escalated is not None:
            result.planned_shards = self.with_samples  # plan shards holding an escalated prompt
        if self.incomplete:
            shown = self.incomplete[:5]
            result.notes.append(f"{len(self.incomplete)} of {self.settings.n_shards} samples shards not complete yet "
                                f"(run again to finish): {', '.join(shown)}{' …' if len(self.incomplete) > 5 else ''}")
        _check_extra_files(self.store, layout.SAMPLES, self.planned_names, result)
        result.problems += self.later.problems
        result.notes += self.later.notes
        for table in layout.DERIVED_TABLES:  # shards of no complete samples shard: their markers only
            for name in sorted(self.derived[table]):
                _check_shard(self.store, table, name, result)
            _check_extra_files(self.store, table, set(), result, derived=True)

    def _classify(self, prompts_file: Path) -> None:
        """Each sample found outside its planned shard is a duplicate (its planned shard holds it
        too), misplaced (it does not) or unplanned (no shard plans it)."""
        wanted: dict[str, list[int]] = {}
        for sid, _ in self.outside:
            pid, _, idx = sid.rpartition("-")
            if idx.isdigit():
                wanted.setdefault(pid, []).append(int(idx))
        planned = planned_shard_of(prompts_file, self.settings, wanted)
        unplanned: list[str] = []
        misplaced: dict[str, list[str]] = {}
        for sid, found_in in self.outside:
            pid, _, idx = sid.rpartition("-")
            home = planned.get((pid, int(idx))) if idx.isdigit() else None
            if home is None:
                unplanned.append(sid)
            elif home in self.complete and sid not in self.missing:
                self.duplicated.add(sid)
            else:
                self.missing.pop(sid, None)
                misplaced.setdefault(found_in, []).append(sid)
        self.duplicated |= {sid for sid, n in Counter(sid for sid, _ in self.outside).items() if n > 1}
        for name, sids in misplaced.items():
            self.result.problems.append(f"samples/{name}: {len(sids)} samples planned for another shard, e.g. {sids[0]}")
        for found, what in ((sorted(self.duplicated), "sample_ids present more than once"),
                            (sorted(set(unplanned)), "sample_ids not in the plan"),
                            (sorted(self.missing), "planned sample_ids missing from complete shards")):
            if found:
                self.result.problems.append(f"{len(found)} {what}, e.g. {found[0]}")


def _names_on_disk(store: RunStore, table: str) -> set[str]:
    """The shards of a table: its files and its markers (a marker without its file is a finding)."""
    folder = store.table_dir(table)
    if not folder.is_dir():
        return set()
    names = {p.stem for p in folder.glob("*.parquet")}
    return names | {p.stem for p in (folder / MARKERS).glob("*.json")}


@dataclass
class ShardRead:
    """One shard checked against its marker: its ids (None when incomplete or damaged) and what
    was found, kept apart so that shards can be read on threads and reported in plan order."""

    ids: pa.Array | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def into(self, result: Verification) -> pa.Array | None:
        result.problems += self.problems
        result.notes += self.notes
        return self.ids


def _check_shard(store: RunStore, table: str, name: str, result: Verification) -> pa.Array | None:
    return _read_shard(store, table, name).into(result)


def _read_shard(store: RunStore, table: str, name: str) -> ShardRead:
    """The ids of a complete shard (sample_id, or prompt_id for per-prompt tables) after checking
    it against its marker; no ids if incomplete."""
    found = ShardRead()
    path, marker = store.shard_path(table, name), store.read_marker(table, name)
    if marker is None:
        if path.exists():
            found.notes.append(f"{table}/{name}: file without a completion marker (an unfinished write; redone on "
                               "the next run)")
        return found
    where = f"{table}/{name}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        found.problems.append(f"{where}: marker says complete but the file is missing")
        return found
    if size != marker.get("bytes"):
        found.problems.append(f"{where}: {size} bytes, its marker says {marker.get('bytes')}")
        return found
    # A small file is read once, hashed and parsed from memory; a large one is hashed as a stream.
    data = path.read_bytes() if size <= WHOLE_READ else None
    if (file_sha256(path) if data is None else hashlib.sha256(data).hexdigest()) != marker.get("sha256"):
        found.problems.append(f"{where}: sha256 differs from its marker (the file changed after it was written)")
        return found
    try:
        by_prompt = table in (layout.PROMPT_SCORES, layout.SCREEN)
        source = path if data is None else pa.BufferReader(data)
        ids = pq.ParquetFile(source).read(columns=["prompt_id"] if by_prompt else ["sample_id"],
                                          use_threads=False).column(0).combine_chunks()  # already on a reader thread
    except Exception as exc:  # noqa: BLE001 - an unreadable file is a finding, not a crash
        found.problems.append(f"{where}: unreadable Parquet ({type(exc).__name__}: {exc})")
        return found
    rows = marker.get("rows")
    if table in (layout.SAMPLES, layout.EMBEDDINGS, layout.PROMPT_SCORES, layout.SCREEN) and rows is not None \
            and rows != len(ids):
        found.problems.append(f"{where}: {len(ids)} rows, its marker says {rows}")
    found.ids = ids
    return found


def _check_extra_files(store: RunStore, table: str, names: set[str], result: Verification, derived: bool = False) -> None:
    folder = store.table_dir(table)
    if not folder.is_dir():
        return
    leftovers = [p.name for p in folder.iterdir() if is_temporary(p.name)]
    if leftovers:
        result.notes.append(f"{table}/: {len(leftovers)} temporary files of interrupted writes (removed by the "
                            f"next run after a day), e.g. {leftovers[0]}")
    if not derived:
        stray = [p.name for p in folder.glob("*.parquet") if p.stem not in names]
        if stray:
            result.problems.append(f"{table}/: {len(stray)} files that are not planned shards, e.g. {stray[0]}")


def _check_screen(store: RunStore, info: dict[str, Any], prompts_file: Path, result: Verification) -> pa.Array | None:
    """A screened run (docs/screening.md): checks screen/ (every planned prompt screened exactly
    once, in its shard) and returns the escalated prompts' ids, the only ones with samples (none
    until the screen is decided). None for a run without a screen: every prompt is audited."""
    screen = info["config"].get("screen")
    if screen is None:
        return None
    per_shard = int(screen["prompts_per_shard"])
    n_prompts = pq.ParquetFile(prompts_file).metadata.num_rows
    n_screen = -(-n_prompts // per_shard)
    complete = 0
    twice = 0
    for i, expected in enumerate(prompt_slices(prompts_file, per_shard)):
        name = shard_name(i, n_screen)
        ids = _check_shard(store, layout.SCREEN, name, result)
        if ids is None:
            continue
        complete += 1
        if not ids.equals(expected):
            result.problems.append(f"screen/{name}: holds other prompts than planned for it")
            counts = pc.value_counts(ids)
            twice += int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0)
    _check_extra_files(store, layout.SCREEN, {shard_name(i, n_screen) for i in range(n_screen)}, result)
    if twice:
        result.problems.append(f"screen/: {twice} prompts screened more than once in one shard")
    if complete < n_screen:
        result.notes.append(f"{n_screen - complete} of {n_screen} screen shards not complete yet (run again to finish)")
    path = store.path / layout.escalation_file()
    if not path.exists():
        if complete == n_screen:
            result.notes.append("the screen is complete but not decided yet (escalation/ missing): run again")
        return pa.array([], pa.string())
    escalation = pq.read_table(path, columns=["prompt_id", "escalated"])
    decided = escalation.column("prompt_id").combine_chunks()
    if not _same_prompts(prompts_file, decided):
        result.problems.append("escalation/: its prompts are not the run's planned prompts")
    return decided.filter(pc.fill_null(escalation.column("escalated").combine_chunks(), False))


def _same_prompts(prompts_file: Path, decided: pa.Array) -> bool:
    """Whether the escalation decided each planned prompt exactly once, and nothing else."""
    if pq.ParquetFile(prompts_file).metadata.num_rows != len(decided) or pc.count_distinct(decided).as_py() != len(decided):
        return False
    return all(_within(batch, decided) for batch in prompt_slices(prompts_file, 65_536))


def _within(values: pa.Array, of: pa.Array) -> bool:
    """Whether every one of ``values`` is among ``of`` (true for none)."""
    return bool(pc.all(pc.is_in(values, value_set=of), min_count=0).as_py())
