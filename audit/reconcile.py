"""``memaudit verify RUN``: reconcile a run folder with its plan — every planned sample_id present
exactly once, nothing unplanned, every marker matching its file (size, sha256, rows), derived
tables aligned with the samples they were computed from, and no leftover temporary files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from audit import layout
from audit.errors import InputError
from audit.files import MARKERS, file_sha256, is_temporary
from audit.ids import sample_id, shard_name
from audit.plan import plan_shard_of, round_ends, round_shard_name
from audit.store import RunStore


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
    prompts = pq.read_table(prompts_file, columns=["prompt_id", "shard"]).to_pydict()
    per_prompt = int(info["config"]["generation"]["samples_per_prompt"])
    n_shards = int(info["prompts"]["n_shards"])
    result = Verification(planned_shards=n_shards)
    audited = _audited_prompts(store, info, prompts["prompt_id"], result)
    planned: dict[str, str] = {}  # sample_id -> shard name
    for prompt_id, shard in zip(prompts["prompt_id"], prompts["shard"]):
        if audited is not None and prompt_id not in audited:
            continue  # decided by the screen: no samples planned
        for idx in range(per_prompt):
            planned[sample_id(prompt_id, idx)] = shard_name(int(shard), n_shards)
    plan_of = {pid: shard_name(int(shard), n_shards) for pid, shard in zip(prompts["prompt_id"], prompts["shard"])}
    planned |= _round_samples(store, info, plan_of)
    result.planned_samples = len(planned)
    names = [shard_name(i, n_shards) for i in range(n_shards)]
    names += sorted(set(planned.values()) - set(names))  # later rounds' shards
    present: Counter[str] = Counter()
    ids_by_shard: dict[str, list[str]] = {}
    for name in names:
        ids = _check_shard(store, layout.SAMPLES, name, result)
        if ids is None:
            continue
        result.complete_shards += 1
        ids_by_shard[name] = ids
        present.update(ids)
        misplaced = [s for s in ids if s in planned and planned[s] != name]
        if misplaced:
            result.problems.append(f"samples/{name}: {len(misplaced)} samples planned for another shard, e.g. {misplaced[0]}")
    result.present_samples = sum(present.values())
    duplicated = [s for s, n in present.items() if n > 1]
    if duplicated:
        result.problems.append(f"{len(duplicated)} sample_ids present more than once, e.g. {duplicated[0]}")
    unplanned = [s for s in present if s not in planned]
    if unplanned:
        result.problems.append(f"{len(unplanned)} sample_ids not in the plan, e.g. {unplanned[0]}")
    missing = [s for s, shard in planned.items() if s not in present and shard in ids_by_shard]
    if missing:
        result.problems.append(f"{len(missing)} planned sample_ids missing from complete shards, e.g. {missing[0]}")
    with_samples = set(planned.values())
    if audited is not None:
        result.planned_shards = len(with_samples)  # plan shards holding an escalated prompt
    incomplete = [n for n in names if n not in ids_by_shard and n in with_samples]
    if incomplete:
        result.notes.append(f"{len(incomplete)} of {n_shards} samples shards not complete yet (run again to finish): "
                            f"{', '.join(incomplete[:5])}{' …' if len(incomplete) > 5 else ''}")
    _check_extra_files(store, layout.SAMPLES, set(names), result)
    by_plan: dict[str, list[str]] = {}  # matches/ and prompt_scores/ cover every round of a plan shard
    for name, ids in ids_by_shard.items():
        by_plan.setdefault(plan_shard_of(name), []).extend(ids)
    for table in layout.DERIVED_TABLES:
        _check_derived(store, table, by_plan if table in (layout.MATCHES, layout.PROMPT_SCORES) else ids_by_shard,
                       result)
    return result


def _round_samples(store: RunStore, info: dict[str, Any], plan_of: dict[str, str]) -> dict[str, str]:
    """An adaptive run's later rounds (docs/screening.md, "Rounds"): sample_id -> round shard, for
    the prompts each recorded decision sent on to the next round."""
    generation = info["config"]["generation"]
    ends = round_ends(int(generation["samples_per_prompt"]), generation.get("max_samples_per_prompt"))
    planned: dict[str, str] = {}
    for k in range(1, len(ends)):
        path = store.path / layout.round_file(k - 1)
        if not path.exists():
            break
        table = pq.read_table(path, columns=["prompt_id", "decision"]).to_pydict()
        for pid, decision in zip(table["prompt_id"], table["decision"]):
            if decision == "continue":
                for idx in range(ends[k - 1], ends[k]):
                    planned[sample_id(pid, idx)] = round_shard_name(plan_of[pid], k)
    return planned


def _check_shard(store: RunStore, table: str, name: str, result: Verification) -> list[str] | None:
    """sample_ids of a complete shard after checking it against its marker; None if incomplete."""
    path, marker = store.shard_path(table, name), store.read_marker(table, name)
    if marker is None:
        if path.exists():
            result.notes.append(f"{table}/{name}: file without a completion marker (an unfinished write; redone on "
                                "the next run)")
        return None
    where = f"{table}/{name}"
    if not path.exists():
        result.problems.append(f"{where}: marker says complete but the file is missing")
        return None
    if path.stat().st_size != marker.get("bytes"):
        result.problems.append(f"{where}: {path.stat().st_size} bytes, its marker says {marker.get('bytes')}")
        return None
    if file_sha256(path) != marker.get("sha256"):
        result.problems.append(f"{where}: sha256 differs from its marker (the file changed after it was written)")
        return None
    try:
        by_prompt = table in (layout.PROMPT_SCORES, layout.SCREEN)
        table_ = pq.read_table(path, columns=["prompt_id"] if by_prompt else ["sample_id"])
    except Exception as exc:  # noqa: BLE001 - an unreadable file is a finding, not a crash
        result.problems.append(f"{where}: unreadable Parquet ({type(exc).__name__}: {exc})")
        return None
    ids = table_.column(0).to_pylist()
    rows = marker.get("rows")
    if table in (layout.SAMPLES, layout.EMBEDDINGS, layout.PROMPT_SCORES, layout.SCREEN) and rows is not None \
            and rows != len(ids):
        result.problems.append(f"{where}: {len(ids)} rows, its marker says {rows}")
    return ids


def _check_derived(store: RunStore, table: str, samples: dict[str, list[str]], result: Verification) -> None:
    folder = store.table_dir(table)
    if not folder.is_dir():
        return
    names = sorted(p.stem for p in folder.glob("*.parquet")) + sorted(
        p.stem for p in (folder / MARKERS).glob("*.json") if not (folder / f"{p.stem}.parquet").exists())
    for name in dict.fromkeys(names):
        ids = _check_shard(store, table, name, result)
        if ids is None or name not in samples:
            continue
        if table == layout.EMBEDDINGS and ids != samples[name]:
            result.problems.append(f"embeddings/{name}: rows are not aligned with samples/{name}")
        elif table in (layout.NEIGHBORS, layout.MATCHES) and not set(ids) <= set(samples[name]):
            result.problems.append(f"{table}/{name}: rows for samples that samples/{name} does not hold")
    _check_extra_files(store, table, set(samples), result, derived=True)


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


def _audited_prompts(store: RunStore, info: dict[str, Any], prompt_ids: list[str],
                     result: Verification) -> set[str] | None:
    """A screened run (docs/screening.md): checks screen/ (every planned prompt screened exactly
    once, in its shard) and returns the escalated prompts, the only ones with samples (none until
    the screen is decided). None for a run without a screen: every prompt is audited."""
    screen = info["config"].get("screen")
    if screen is None:
        return None
    per_shard = int(screen["prompts_per_shard"])
    n_screen = -(-len(prompt_ids) // per_shard)
    seen: Counter[str] = Counter()
    complete = 0
    for i in range(n_screen):
        name = shard_name(i, n_screen)
        ids = _check_shard(store, layout.SCREEN, name, result)
        if ids is None:
            continue
        complete += 1
        seen.update(ids)
        expected = prompt_ids[i * per_shard:(i + 1) * per_shard]
        if ids != expected:
            result.problems.append(f"screen/{name}: holds other prompts than planned for it")
    _check_extra_files(store, layout.SCREEN, {shard_name(i, n_screen) for i in range(n_screen)}, result)
    twice = [p for p, n in seen.items() if n > 1]
    if twice:
        result.problems.append(f"screen/: {len(twice)} prompts screened more than once, e.g. {twice[0]}")
    if complete < n_screen:
        result.notes.append(f"{n_screen - complete} of {n_screen} screen shards not complete yet (run again to finish)")
    path = store.path / layout.escalation_file()
    if not path.exists():
        if complete == n_screen:
            result.notes.append("the screen is complete but not decided yet (escalation/ missing): run again")
        return set()
    escalation = pq.read_table(path, columns=["prompt_id", "escalated"]).to_pydict()
    if sorted(escalation["prompt_id"]) != sorted(prompt_ids):
        result.problems.append("escalation/: its prompts are not the run's planned prompts")
    return {p for p, up in zip(escalation["prompt_id"], escalation["escalated"]) if up}
