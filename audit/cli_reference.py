"""``memaudit reference ...``: build the training-set side (embeddings, faiss index, dup counts)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from audit.cli_report import location
from audit.config import AuditConfig
from audit.errors import InputError
from audit.files import LEASE_FILE
from audit.lease import Lease, LeaseCheck
from audit.location import Location

WAIT_HELP = "when another driver is writing this reference folder, wait for it (default: exit 6)"
WRITES = {"embed": "out", "index": "folder", "dups": "folder", "calibrate": "folder", "testbed": "out"}  # leased


def add_parser(commands: argparse._SubParsersAction, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    reference = commands.add_parser("reference", help="the training-set side: embed, index, duplicate counts")
    actions = reference.add_subparsers(dest="action", required=True, metavar="ACTION")
    embed = actions.add_parser("embed", help="embed an img2dataset output folder into the LAION layout (on Ray)")
    embed.add_argument("source", type=location, help="img2dataset output folder (webdataset or parquet format)")
    embed.add_argument("out", type=location, help="reference folder to write (img_emb/, metadata/, rejected/)")
    embed.add_argument("--address", help="Ray cluster to join: host:port, ray://host:port, or auto for the "
                                         "one `ray start` runs on this machine (default: the config's "
                                         "compute.address, else $RAY_ADDRESS, else a private local Ray, "
                                         "even when a cluster runs here)")
    embed.add_argument("--wait", action="store_true", help=WAIT_HELP)
    with_config(embed)
    index = actions.add_parser("index", help="build faiss index shards and a manifest for an embedding folder")
    index.add_argument("folder", type=location, help="embedding folder (memaudit's or precomputed LAION embeddings)")
    index.add_argument("--out", type=location, help="index folder (default: FOLDER/index)")
    index.add_argument("--factory", help="faiss factory string (overrides reference.index_factory)")
    index.add_argument("--wait", action="store_true", help=WAIT_HELP)
    with_config(index)
    dups = actions.add_parser("dups", help="near-duplicate count of every reference item (needs the index)")
    dups.add_argument("folder", type=location)
    dups.add_argument("--wait", action="store_true", help=WAIT_HELP)
    with_config(dups)
    calibrate = actions.add_parser("calibrate", help="measure the train->train null that calibrated detection "
                                                     "thresholds come from (needs the index)")
    calibrate.add_argument("folder", type=location)
    calibrate.add_argument("--force", action="store_true", help="measure again over an existing calibration")
    calibrate.add_argument("--wait", action="store_true", help=WAIT_HELP)
    with_config(calibrate)
    validate = actions.add_parser("validate", help="check an embedding folder and report bad rows")
    validate.add_argument("folder", type=location)
    testbed = actions.add_parser("testbed", help="the testbed's training set as a reference: embed, index, dups, "
                                                 "calibrate")
    testbed.add_argument("out", type=location, help="reference folder to write")
    testbed.add_argument("--testbed", choices=["glyphs", "maps", "lora"], default="glyphs",
                         help="which shipped testbed: glyphs (builtin:testbed), maps (builtin:testbed-maps) or "
                              "lora (what the LoRA testbed was trained on: its fine-tuning set, on builtin:testbed)")
    testbed.add_argument("--wait", action="store_true", help=WAIT_HELP)
    with_config(testbed)


def run(args: argparse.Namespace, cfg: AuditConfig | None) -> int:
    """Object-store folders are worked on in their local mirror; what was written is published.
    A command that writes a reference folder holds its lease (:mod:`audit.lease`) throughout, and
    checks it before publishing."""
    with ExitStack() as stack:
        for name in ("folder", "out", "source"):
            value = getattr(args, name, None)
            if isinstance(value, Location):
                _check_folder(value, name)
        lease = None
        if args.action in WRITES:
            assert cfg is not None
            target = getattr(args, WRITES[args.action])
            lease = stack.enter_context(Lease(target, "reference folder", ttl_s=cfg.compute.lease_ttl_s,
                                              command=f"memaudit reference {args.action}").acquire(args.wait)).check
        for name in ("folder", "out"):  # `embed` reads and writes object stores itself, shard by shard
            value = getattr(args, name, None)
            if value is not None and args.action != "embed":
                setattr(args, name, stack.enter_context(value.working_copy(
                    publish=args.action != "validate", check=None if lease is None else lease.verify)))
        return _dispatch(args, cfg, lease)


def _check_folder(where: Location, name: str) -> None:
    if not where.is_remote and where.local.exists() and not where.local.is_dir():
        raise InputError(f"{name.upper()} {where.local} is a file, not a folder; pass the folder (a reference folder, "
                         "or the img2dataset output folder for embed's SOURCE)")


def _dispatch(args: argparse.Namespace, cfg: AuditConfig | None, lease: LeaseCheck | None) -> int:
    if args.action == "validate":
        return _validate(args.folder)
    assert cfg is not None
    if args.action == "embed":
        return _embed(cfg, args.source, args.out, args.address, lease)
    if args.action == "index":
        return _index(cfg, args.folder, args.out, args.factory)
    if args.action == "dups":
        return _dups(cfg, args.folder)
    if args.action == "calibrate":
        return _calibrate(cfg, args.folder, args.force)
    return _testbed(cfg, args.out, args.testbed, lease)


def _embed(cfg: AuditConfig, source: Location | Path, out: Location | Path, address: str | None,
           lease: LeaseCheck | None) -> int:
    from audit.pipeline.reference import embed_reference

    report = embed_reference(cfg, source, out, address, lease)
    rejected = Counter({k.removeprefix("rejected:"): n for k, n in report.counts.items() if k.startswith("rejected:")})
    embedded = report.counts["rows_embedded"]
    per_second = (embedded + sum(rejected.values())) / report.busy_s if report.busy_s else 0.0
    print(f"reference: {out}")
    print(f"shards: {report.shards_written} embedded now, {report.shards_skipped} of {report.shards_total} already "
          f"complete; images embedded: {embedded}; rejected: "
          + (", ".join(f"{n} {reason}" for reason, n in rejected.most_common()) or "none")
          + (f"; {per_second:.1f} images/s" if report.busy_s else ""))
    if report.shards_failed:
        name, why = next(iter(report.shards_failed.items()))
        print(f"memaudit: {len(report.shards_failed)} shards failed (e.g. {name}: {why}); run again to retry them")
        return 1
    return 0


def _index(cfg: AuditConfig, folder: Path, out: Path | None, factory: str | None) -> int:
    from audit.reference.calibration import remove_calibration
    from audit.reference.index import build_index

    section = cfg.reference if factory is None else cfg.reference.model_copy(update={"index_factory": factory})
    manifest = build_index(folder, section, out)
    remove_calibration(folder)  # measured on the previous index: measured again when next needed
    print(f"index: {(out or folder / 'index') / 'manifest.json'}")
    print(f"{manifest['count']} vectors (dim {manifest['embedding']['dim']}, {manifest['embedding']['model_id']}) in "
          f"{len(manifest['shards'])} shards, {manifest['factory']}; {manifest['excluded']} rows excluded, "
          f"{manifest['renormalised']} re-normalised, {manifest['duplicate_keys']} duplicate keys")
    return 0


def _dups(cfg: AuditConfig, folder: Path) -> int:
    from audit.reference.dups import write_dups
    from audit.reference.search import ReferenceIndex

    histogram = write_dups(folder, ReferenceIndex(folder), cfg.reference.dup_threshold)
    top = sorted(((int(k), v) for k, v in histogram.items() if k != "excluded"), reverse=True)[:5]
    print(f"dups: {folder / 'dups'} (cosine >= {cfg.reference.dup_threshold})")
    print("most duplicated: " + ", ".join(f"{v} items with {k} duplicates" for k, v in top))
    return 0


def _calibrate(cfg: AuditConfig, folder: Path, force: bool) -> int:
    from audit.reference.calibration import CALIBRATION_DIR, calibrate, describe, load_calibration
    from audit.reference.index import INDEX_DIR, load_manifest

    model_id = load_manifest(folder / INDEX_DIR)["embedding"]["model_id"]
    if not force and load_calibration(folder, cfg.detection, model_id) is not None:
        print(f"calibration: {folder / CALIBRATION_DIR} is current for these settings (--force measures it again)")
        return 0
    record = calibrate(folder, cfg.detection, cfg.reference)
    print(f"calibration: {folder / CALIBRATION_DIR}")
    print(describe(record))
    return 0


def _validate(folder: Path) -> int:
    from audit.reference.folder import validate_folder

    check = validate_folder(folder)
    reasons = Counter(reason.split(":")[0] for reason in check.excluded.values())
    print(json.dumps({"folder": str(folder), "files": len(check.files), "rows": check.total_rows, "dim": check.dim,
                      "dtype": check.dtype, "model_id": check.model_id, "excluded": dict(reasons),
                      "renormalised": check.renormalised_rows, "duplicate_keys": check.duplicate_keys}, indent=2))
    return 0


def _testbed(cfg: AuditConfig, out: Path, kind: str, lease: LeaseCheck | None) -> int:
    from audit.reference.training_set import SOURCE_DIR, write_shipped_training_set
    from audit.testbed.checkpoints import SHIPPED_KINDS

    foreign = out.exists() and any(p.name not in {SOURCE_DIR, LEASE_FILE} for p in out.iterdir())
    if foreign and not (out / "embedding.json").exists():
        raise InputError(f"{out}: folder exists and is not a reference folder; choose a new folder")
    source = write_shipped_training_set(out, SHIPPED_KINDS[kind])
    for step in (lambda: _embed(cfg, source, out, None, lease), lambda: _index(cfg, out, None, None),
                 lambda: _dups(cfg, out), lambda: _calibrate(cfg, out, force=False)):
        code = step()
        if code:
            return code
    return 0
