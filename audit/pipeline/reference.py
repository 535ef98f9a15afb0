"""The reference side on Ray: ``memaudit reference embed`` (one task per img2dataset shard,
resumable per shard) and preparing ``reference.path`` before an audit uses it (building a
built-in reference on first use)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from audit.config import AuditConfig, load_config
from audit.errors import InputError
from audit.lease import DEFAULT_TTL_S, Lease, LeaseCheck
from audit.location import Location
from audit.pipeline.pool import WorkerPool, run_tasks
from audit.pipeline.ray_setup import embedding_placement, ray_session
from audit.reference.folder import EMBEDDING_JSON, read_embedding_json, shard_complete, write_embedding_json
from audit.reference.locate import (
    BUILTIN_PREFIX, builtin_reference_folder, builtin_reference_name, is_built, resolve_reference,
)
from audit.reference.sources import find_shards
from audit.remote import pull_tree
from audit.step import ShardTask, StepReport, StepSpec

if TYPE_CHECKING:
    from audit.detect.thresholds import Thresholds

log = logging.getLogger(__name__)


def embed_reference(cfg: AuditConfig, source: str | Path | Location, out: str | Path | Location,
                    address: str | None = None, lease: LeaseCheck | None = None) -> StepReport:
    """Embed an img2dataset output folder into the LAION layout under ``out``; either may be on
    object storage (workers then fetch the shards they embed and publish what they write).
    ``lease``: the check of the caller's lease on ``out`` (:mod:`audit.lease`), verified by the
    workers before each shard is published. ``counts`` holds ``rows_embedded`` and
    ``rejected:<reason>``."""
    from audit.embed.models import model_id_of  # torch: imported only where embedding happens
    from audit.reference.embed_shard import ReferenceEmbedStep

    started_at = time.time()
    target = Location.of(out)
    if target.is_remote:
        pull_tree(target.remote, target.local)  # what is published already is complete: skipped
    root = target.local
    shards = find_shards(source, cfg.reference.input_format)
    model_id = model_id_of(cfg.embedding)
    recorded = read_embedding_json(root)
    if recorded and recorded.get("model_id") != model_id:
        raise InputError(f"{root}: was embedded with {recorded.get('model_id')}, not {model_id}; write to a new "
                         "folder (one reference folder holds one embedding model)")
    todo = [ShardTask(f"shard {s.name}", (s, int(s.name)), 1) for s in shards if not shard_complete(root, int(s.name))]
    if not todo:
        log.info("reference: all %d shards embedded; nothing to do", len(shards))
        return StepReport(shards_total=len(shards), shards_skipped=len(shards))
    with ray_session(address or cfg.compute.address):
        device, resources, n_workers = embedding_placement(cfg.embedding.device, cfg.compute.cpus_per_worker)
        pool = WorkerPool(StepSpec(ReferenceEmbedStep, {"cfg": cfg, "out": target, "device": device,
                                                        "lease": lease}), resources, "reference embedding")
        report = run_tasks(pool, min(n_workers, len(todo)), todo, cfg.compute.max_attempts, "shard", "embed reference")
    report.shards_total, report.shards_skipped = len(shards), len(shards) - len(todo)
    for marker in report.markers:
        report.counts["rows_embedded"] += int(marker["rows_embedded"])
        for why, n in marker.get("rejected_by_reason", {}).items():
            report.counts[f"rejected:{why}"] += int(n)
    if report.markers:
        if lease is not None:
            lease.verify(EMBEDDING_JSON)
        write_embedding_json(root, model_id, int(report.markers[0]["dim"]))
        target.publish_file(root / EMBEDDING_JSON)
    report.seconds = time.time() - started_at
    return report


def _build_testbed_reference(folder: Path, name: str, lease: LeaseCheck) -> None:
    """Embed, index and dup-count the training set of the shipped testbed ``name`` into ``folder``."""
    from audit.reference.dups import write_dups
    from audit.reference.index import build_index
    from audit.reference.search import ReferenceIndex
    from audit.reference.training_set import write_shipped_training_set

    cfg = load_config(None)  # the built-in defaults: builtin:testbed-copy embedding, Flat index
    source = write_shipped_training_set(folder, name)
    report = embed_reference(cfg, source, folder, lease=lease)
    if report.shards_failed:
        raise RuntimeError(f"embedding the testbed reference failed: {report.shards_failed}")
    build_index(folder, cfg.reference)
    write_dups(folder, ReferenceIndex(folder), cfg.reference.dup_threshold)


def reference_lease(path: str, ttl_s: float, command: str) -> Lease:
    """The lease on ``reference.path``'s folder (a built-in one's in the cache), for writing it."""
    where = builtin_reference_folder(path) if path.startswith(BUILTIN_PREFIX) else Location.of(path)
    return Lease(where, "reference folder", ttl_s=ttl_s, command=command)


def prepare_reference(path: str, ttl_s: float = DEFAULT_TTL_S) -> Path:
    """``reference.path`` on this machine, ready to search: a built-in reference is built on first
    use, under its lease (another audit building it is waited for; resumable: embedded shards and
    index shards are kept across attempts; the marker source paths inside are absolute, so it is
    built at its final place), a URI is mirrored."""
    if path.startswith(BUILTIN_PREFIX):
        folder = builtin_reference_folder(path)
        if not is_built(folder):
            with reference_lease(path, ttl_s, "memaudit run").acquire(wait=True) as lease:
                if not is_built(folder):  # built by the holder we waited for
                    log.info("building the built-in reference %s into %s", path, folder)
                    _build_testbed_reference(folder, builtin_reference_name(path), lease.check)
    return resolve_reference(path)


def audit_thresholds(cfg: AuditConfig, reference: Path | None, model_id: str) -> Thresholds:
    """The detection thresholds of an audit against the prepared ``reference`` (calibrating it
    first when it has no calibration, under the reference folder's lease, waiting for another
    writer of it; an object-store reference gets the calibration published)."""
    from audit.detect.thresholds import for_audit

    if reference is None:
        return for_audit(cfg.detection, cfg.reference, None, model_id)
    publish = None
    builtin = str(cfg.reference.path).startswith(BUILTIN_PREFIX)
    if not builtin:
        where = Location.of(cfg.reference.path)
        publish = where.publish_file if where.is_remote else None
    lease = reference_lease(str(cfg.reference.path), cfg.compute.lease_ttl_s, "memaudit run")
    return for_audit(cfg.detection, cfg.reference, reference, model_id, publish, owned=builtin,
                     hold=lambda: lease.acquire(wait=True))
