"""Preparing a run (Ray-free): check inputs, plan prompts, open or create the run folder.

Everything that can fail because of the user's input fails here, in seconds, before a cluster is
touched. A run's identity is the hash of what determines its samples; running the same config
again opens the same folder and resumes it, and a folder created with different settings is
never mixed with new ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from audit import provenance
from audit.config import AuditConfig, fingerprint
from audit.errors import InputError
from audit.generate.loading import (
    PipelineInfo,
    ResolvedModel,
    checkpoint_digest,
    preflight,
    resolve_numerics,
)
from audit.generate.adapters import checkpoint_identity
from audit.generate.tokens import truncated_prompts
from audit.plan import PromptPlan, plan_prompts
from audit.prompts import read_prompts
from audit.redact import redact
from audit.screen.run_screen import check_screen
from audit import layout
from audit.location import Location
from audit.files import LEASE_FILE
from audit.lease import Lease, LeaseCheck
from audit.store import RunStore, run_location

log = logging.getLogger(__name__)
RUN_FORMAT = 1


@dataclass(frozen=True)
class PreparedRun:
    """Checked inputs of a run."""

    cfg: AuditConfig
    model: ResolvedModel
    pipeline: PipelineInfo
    checkpoint: dict[str, Any]
    plan: PromptPlan

    @cached_property
    def truncated(self) -> dict[str, Any]:
        """Prompts longer than the text encoder takes (``run.json: prompts.truncated``). Measured
        only when a run is created: tokenising every prompt costs about a minute per 10⁶ prompts,
        and a resume reads the record from run.json (docs/architecture.md, "Scale")."""
        return truncated_prompts(self.model.folder, self.plan.table.column("prompt_id").to_pylist(),
                                 self.plan.table.column("prompt").to_pylist())


def prepare_run(cfg: AuditConfig) -> PreparedRun:
    """Check the checkpoint and the prompts, hash the checkpoint, plan the shards."""
    if cfg.model.device != "auto":
        resolve_numerics(cfg.model, has_cuda=True)  # device/dtype clashes, before any cluster
    Location.of(cfg.run.root).check_writable("run.root")
    model, info = preflight(cfg.model, cfg.generation)
    raw = read_prompts(cfg.prompts)
    plan = plan_prompts(raw, cfg.generation.prompts_per_shard, cfg.prompts.limit)
    log.info(
        "%d distinct prompts (%d duplicates merged, %d blank skipped) in %d shards",
        plan.n_prompts, plan.duplicates, plan.skipped_blank, plan.n_shards,
    )
    if cfg.screen is not None:
        check_screen(cfg.screen, info.family, cfg.generation, plan.n_prompts)
    log.info("hashing checkpoint %s", model.folder)
    checkpoint = checkpoint_digest(model.folder)
    # A LoRA adapter makes another checkpoint: its hash and scale join the content hash.
    checkpoint = {**checkpoint, "base_sha256": checkpoint["sha256"],
                  "sha256": checkpoint_identity(checkpoint["sha256"], list(info.adapters))}
    return PreparedRun(cfg, model, info, checkpoint, plan)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class RunFolder:
    """Where a run lives and what makes it that run."""

    where: Location
    identity: dict[str, Any]
    digest: str
    model_name: str
    checkpoint_id: str
    run_id: str


def run_folder(prepared: PreparedRun, device_type: str, dtype: str) -> RunFolder:
    """The run folder ``prepared`` resolves to on a cluster of ``device_type`` (the run's id hashes
    its identity unless ``run.run_id`` names it)."""
    cfg = prepared.cfg
    identity = cfg.result_identity(prepared.checkpoint["sha256"], prepared.plan.sha256, device_type, dtype)
    digest = fingerprint(identity)
    model_name = cfg.run.model_name or prepared.model.default_name
    checkpoint_id = cfg.run.checkpoint_id or prepared.checkpoint["sha256"][:12]
    run_id = cfg.run.run_id or digest[:12]
    where = run_location(cfg.run.root, model_name, checkpoint_id, run_id)
    return RunFolder(where, identity, digest, model_name, checkpoint_id, run_id)


def create_or_resume_run(prepared: PreparedRun, device_type: str, dtype: str, force: bool = False,
                         lease: LeaseCheck | None = None) -> RunStore:
    """Create the run folder (prompts table, then run.json) or reopen a matching one. A folder
    made with other settings is refused, or with ``force`` set aside (its files moved to a renamed
    sibling, never deleted). ``lease``: the caller's lease on the folder (:mod:`audit.lease`),
    taken before this first write; every write through the returned store checks it."""
    folder = run_folder(prepared, device_type, dtype)
    identity, digest = folder.identity, folder.digest
    store = RunStore(folder.where, lease)
    Location.of(store.path).check_writable("local mirror of the run" if store.mirror else "run folder")
    store.sync()
    existing = store.read_json()
    if existing is not None:
        try:
            _check_same_run(store, existing, identity, digest)
        except InputError:
            if not force:
                raise
            if store.mirror is not None:
                raise InputError(f"{store.location}: --force cannot set a run aside on an object store (objects "
                                 "cannot be renamed); set another run.run_id instead") from None
            aside = _set_aside(store.path)
            log.warning("--force: the run folder made with other settings is kept as %s; starting it again", aside)
            existing = None
    if not (store.path / layout.prompts_file()).exists():
        store.write_table(layout.PROMPTS, layout.PROMPTS_FILE, prepared.plan.table)
    if existing is None:
        store.write_json(redact(_run_json(prepared, identity, digest, folder.model_name, folder.checkpoint_id,
                                          folder.run_id)))
        log.info("new run %s", store.location)
    else:
        log.info("resuming run %s", store.location)
    return store


@contextmanager
def leased_run(prepared: PreparedRun, device_type: str, dtype: str, force: bool, wait: bool,
               command: str) -> Iterator[tuple[RunStore, Lease]]:
    """The run folder opened (:func:`create_or_resume_run`) under its lease, held for the block:
    the one way ``run``, ``screen`` and ``watch`` open a run to write it (docs/architecture.md,
    "Leases")."""
    where = run_folder(prepared, device_type, dtype).where
    with Lease(where, "run", ttl_s=prepared.cfg.compute.lease_ttl_s, command=command).acquire(wait) as lease:
        yield create_or_resume_run(prepared, device_type, dtype, force, lease.check), lease


def _set_aside(path: Path) -> Path:
    """Move a run folder's files to a renamed sibling; the lease file stays, still held."""
    aside = path.with_name(f"{path.name}.superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    aside.mkdir()
    for child in path.iterdir():
        if child.name != LEASE_FILE:
            child.rename(aside / child.name)
    return aside


def _check_same_run(store: RunStore, existing: dict[str, Any], identity: dict[str, Any], digest: str) -> None:
    if existing.get("fingerprint") == digest:
        before = existing.get("environment", {}).get("packages", {})
        now = provenance.package_versions()
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
        if changed:
            log.warning("resuming with other package versions than the run started with: %s", ", ".join(changed))
        return
    old, new = _flatten(existing.get("identity", {})), _flatten(redact(identity))
    differences = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    raise InputError(
        f"{store.location}: this run was made with other settings ({'; '.join(differences) or 'unknown'}); "
        "set another run.run_id, or pass --force to set this folder aside (renamed, nothing deleted) and start again"
    )


def _run_json(
    prepared: PreparedRun,
    identity: dict[str, Any],
    digest: str,
    model_name: str,
    checkpoint_id: str,
    run_id: str,
) -> dict[str, Any]:
    plan, cfg = prepared.plan, prepared.cfg
    return {
        "format": RUN_FORMAT,
        "run_id": run_id,
        "model_name": model_name,
        "checkpoint_id": checkpoint_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": digest,
        "identity": identity,
        "config": cfg.to_dict(),
        # Not "checkpoint": readers that detect hive partitions (DuckDB) add model, checkpoint
        # and run columns from the path, which would shadow a key of the same name.
        "pipeline": {
            "ref": prepared.model.ref,
            "kind": prepared.model.kind,
            "folder": str(prepared.model.folder),
            "pipeline_class": prepared.pipeline.class_name,
            "scheduler": cfg.model.scheduler or prepared.pipeline.scheduler_class,
            "content_sha256": prepared.checkpoint["sha256"],
            "base_content_sha256": prepared.checkpoint["base_sha256"],
            "files": prepared.checkpoint["files"],
            "bytes": prepared.checkpoint["bytes"],
        },
        "family": prepared.pipeline.record(cfg.generation),
        "prompts": {
            "source": cfg.prompts.source,
            "n_prompts": plan.n_prompts,
            "duplicates_merged": plan.duplicates,
            "blank_skipped": plan.skipped_blank,
            "prompts_sha256": plan.sha256,
            "n_shards": plan.n_shards,
            "samples_per_prompt": cfg.generation.samples_per_prompt,
            "n_samples": plan.n_prompts * cfg.generation.samples_per_prompt,
            "truncated": prepared.truncated,
        },
        "environment": provenance.environment(),
    }
