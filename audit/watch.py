"""``memaudit watch DIR``: audit every checkpoint under DIR not audited yet, exactly once, then
compare it with the previous checkpoint of the same model.

A checkpoint is a diffusers folder (``model_index.json``) under DIR; its order is the natural
order of its path (``step-900`` before ``step-1000``), the order a training job writes them. State
lives under ``<run.root>/.watch/<model>/``: ``<checkpoint>.json`` once its audit finished (with the
run folder and a signature of the folder's files, so an overwritten checkpoint is audited
again) and ``<checkpoint>.lock``, held with ``flock`` while it is audited — an overlapping
invocation (cron, a RayCronJob) skips a locked checkpoint and leaves it to the holder. A
checkpoint's comparison with its predecessor is written once both are audited, by whichever
invocation sees that first; so `watch` can be called blindly and repeatedly.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.config import AuditConfig, load_config
from audit.errors import InputError
from audit.store import folder_safe, write_bytes_atomic

log = logging.getLogger(__name__)
STATE_DIR = ".watch"


@dataclass
class WatchReport:
    audited: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    skipped_locked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)  # checkpoint -> compare summary
    gate_failures: dict[str, list[str]] = field(default_factory=dict)


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_checkpoints(folder: Path) -> list[Path]:
    """Diffusers folders under ``folder`` (itself included), in natural path order."""
    if not folder.is_dir():
        raise InputError(f"watch: {folder} is not a folder; pass the folder your training job writes checkpoints to")
    found = {p.parent for p in folder.rglob("model_index.json") if STATE_DIR not in p.parts}
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(folder))))


def signature(checkpoint: Path) -> str:
    """Names, sizes and mtimes of a checkpoint's files: changes when it is overwritten."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(checkpoint)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def checkpoint_name(folder: Path, checkpoint: Path) -> str:
    rel = checkpoint.relative_to(folder)
    name = "--".join(rel.parts) if rel.parts else checkpoint.name
    return folder_safe(name)


@contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` if nobody else does (yields False otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def watch(folder: Path, config: Path | None, overrides: list[str], model_name: str | None = None,
          address: str | None = None, fail_if_new: bool = False, max_rate_increase: float | None = None) -> WatchReport:
    """Audit the new checkpoints under ``folder`` and compare each with its predecessor."""
    folder = folder.resolve()
    base = load_config(config, overrides)  # bad config: refused before anything runs
    model = model_name or folder_safe(folder.name)
    state = Path(base.run.root) / STATE_DIR / model
    checkpoints = find_checkpoints(folder)
    report = WatchReport()
    names = [checkpoint_name(folder, c) for c in checkpoints]
    todo = [(n, c) for n, c in zip(names, checkpoints) if not _is_done(state, n, c)]
    report.skipped_done = [n for n in names if n not in {t[0] for t in todo}]
    if todo:
        from audit.pipeline.ray_setup import ray_session

        with ray_session(address or base.compute.address):
            for name, checkpoint in todo:
                _audit_one(state, name, checkpoint, config, overrides, model, address, report)
    for previous, name in zip(names, names[1:]):
        _compare_pair(state, previous, name, fail_if_new, max_rate_increase, report)
    return report


def _is_done(state: Path, name: str, checkpoint: Path) -> bool:
    marker = state / f"{name}.json"
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    return done.get("signature") == signature(checkpoint) and Path(done["run"]).is_dir()


def _audit_one(state: Path, name: str, checkpoint: Path, config: Path | None, overrides: list[str], model: str,
               address: str | None, report: WatchReport) -> None:
    with try_lock(state / f"{name}.lock") as mine:
        if not mine:
            log.info("watch: %s is being audited by another invocation; skipping it", name)
            report.skipped_locked.append(name)
            return
        if _is_done(state, name, checkpoint):  # finished by another invocation meanwhile
            report.skipped_done.append(name)
            return
        cfg = load_config(config, [*overrides, f"model.path={checkpoint}", f"run.model_name={model}"])
        log.info("watch: auditing %s (%s)", name, checkpoint)
        try:
            run = _audit(cfg, address)
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the others
            log.exception("watch: auditing %s failed", name)
            report.failed[name] = f"{type(exc).__name__}: {exc}"
            return
        write_bytes_atomic(state / f"{name}.json", json.dumps(
            {"checkpoint": str(checkpoint), "signature": signature(checkpoint), "run": str(run)}, indent=2).encode())
        report.audited.append(name)


def _audit(cfg: AuditConfig, address: str | None) -> Path:
    from audit.pipeline import run_audit
    from audit.report.build import write_report

    result = run_audit(cfg, address=address)
    failed = {**result.generation.shards_failed, **result.embeddings.shards_failed, **result.detection.get("failed", {})}
    if failed:
        raise RuntimeError(f"{len(failed)} shards failed (e.g. {next(iter(failed.items()))}); it is retried next time")
    write_report(result.run_path)
    return result.run_path


def _compare_pair(state: Path, previous: str, name: str, fail_if_new: bool, max_rate_increase: float | None,
                  report: WatchReport) -> None:
    from audit.report.compare import compare_runs, default_out, gate, write_compare

    a, b = state / f"{previous}.json", state / f"{name}.json"
    if not (a.is_file() and b.is_file()):
        return
    run_a, run_b = Path(json.loads(a.read_text())["run"]), Path(json.loads(b.read_text())["run"])
    done = state / f"{name}.compared.json"
    if done.is_file() and json.loads(done.read_text()).get("runs") == [str(run_a), str(run_b)]:
        return
    result = compare_runs(run_a, run_b)
    out = write_compare(result, default_out(run_b, result))
    reasons = gate(result, fail_if_new, max_rate_increase)
    summary = {"runs": [str(run_a), str(run_b)], "compare": str(out), "previous": previous,
               "newly_memorized": len(result["newly_memorized"]),
               "no_longer_memorized": len(result["no_longer_memorized"]), "gate": reasons}
    write_bytes_atomic(done, json.dumps(summary, indent=2).encode())
    report.compared[name] = summary
    if reasons:
        report.gate_failures[name] = reasons
