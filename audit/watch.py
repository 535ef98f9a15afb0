"""``memaudit watch DIR``: audit every checkpoint under DIR not audited yet, exactly once, then
compare it with the previous checkpoint of the same model.

A checkpoint is a diffusers folder (``model_index.json``) under DIR — a folder or an object-store
prefix (``s3://bucket/checkpoints/``) — or, when a local DIR holds no diffusers folder, a LoRA
adapter file under it, audited on top of the config's ``model.path`` (a fine-tuning job's saved
adapters; docs/model_families.md); its order is the natural order of its path (``step-900``
before ``step-1000``), the order a training job writes them. State lives under
``<run.root>/.watch/<model>/`` (see :mod:`audit.watch_state`): ``<checkpoint>.json`` once its audit
finished (with the run folder and a signature of the checkpoint's files, so an overwritten
checkpoint is audited again) and ``<checkpoint>.lock`` while it is audited — an overlapping
invocation (cron, a RayCronJob) skips a locked checkpoint and leaves it to the holder. A
checkpoint's comparison with its predecessor is written once both are audited, by whichever
invocation sees that first; so `watch` can be called blindly and repeatedly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.config import AuditConfig, load_config
from audit.errors import InputError
from audit.files import folder_safe
from audit.lease import LeaseHeld
from audit.location import Location
from audit.watch_state import WatchState, find_adapters, find_checkpoints, run_exists, signature, state_for

log = logging.getLogger(__name__)


@dataclass
class WatchReport:
    audited: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    skipped_locked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)  # checkpoint -> compare summary
    gate_failures: dict[str, list[str]] = field(default_factory=dict)


def checkpoint_name(folder: str | Path | Location, checkpoint: str | Path | Location) -> str:
    base, here = str(folder).rstrip("/"), str(checkpoint).rstrip("/")
    rel = here[len(base):].strip("/") if here.startswith(base) else ""
    name = "--".join(p for p in rel.split("/") if p) if rel else here.rsplit("/", 1)[-1]
    return folder_safe(name.removesuffix(".safetensors"))


def watch(folder: str | Path, config: Path | None, overrides: list[str], model_name: str | None = None,
          address: str | None = None, fail_if_new: bool = False, max_rate_increase: float | None = None) -> WatchReport:
    """Audit the new checkpoints under ``folder`` (a folder or an object-store prefix) and
    compare each with its predecessor."""
    folder = Location.of(folder).absolute()
    base = load_config(config, overrides)  # bad config: refused before anything runs
    model = model_name or folder_safe(str(folder).rsplit("/", 1)[-1])
    state = state_for(base.run.root, model)
    checkpoints = find_checkpoints(folder)
    adapters = [] if checkpoints else find_adapters(folder)
    checkpoints = checkpoints or adapters
    if adapters:
        log.info("watch: %d LoRA adapters under %s, audited on top of model.path %s", len(checkpoints), folder,
                 base.model.path)
    report = WatchReport()
    names = [checkpoint_name(folder, c) for c in checkpoints]
    todo = [(n, c) for n, c in zip(names, checkpoints) if not _is_done(state, n, c)]
    report.skipped_done = [n for n in names if n not in {t[0] for t in todo}]
    if todo:
        from audit.pipeline.ray_setup import ray_session

        with ray_session(address or base.compute.address):
            for name, checkpoint in todo:
                checkpoint_overrides = (_adapter_overrides(base, checkpoint) if adapters
                                        else [f"model.path={checkpoint}"])
                _audit_one(state, name, checkpoint, config, [*overrides, *checkpoint_overrides], model, address,
                           report)
    for previous, name in zip(names, names[1:]):
        _compare_pair(state, previous, name, fail_if_new, max_rate_increase, report)
    return report


def _adapter_overrides(base: AuditConfig, adapter: Location) -> list[str]:
    """The config of one watched adapter: the configured base model, its configured adapters and
    this one (scale 1). JSON is YAML, so the list is one override."""
    adapters = [a.model_dump(mode="json") for a in base.model.lora] + [{"path": str(adapter), "scale": 1.0}]
    return [f"model.lora={json.dumps(adapters)}"]


def _is_done(state: WatchState, name: str, checkpoint: Location) -> bool:
    done = state.read(f"{name}.json")
    return done is not None and done.get("signature") == signature(checkpoint) and run_exists(done["run"])


def _audit_one(state: WatchState, name: str, checkpoint: Location, config: Path | None, overrides: list[str],
               model: str, address: str | None, report: WatchReport) -> None:
    ttl_s = load_config(config, overrides).compute.lease_ttl_s
    with state.lock(f"{name}.lock", ttl_s) as mine:
        if not mine:
            log.info("watch: %s is being audited by another invocation; skipping it", name)
            report.skipped_locked.append(name)
            return
        if _is_done(state, name, checkpoint):  # finished by another invocation meanwhile
            report.skipped_done.append(name)
            return
        cfg = load_config(config, [*overrides, f"run.model_name={model}"])
        log.info("watch: auditing %s (%s)", name, checkpoint)
        try:
            run = _audit(cfg, address)
        except LeaseHeld as exc:  # its run is being written by another driver (e.g. a manual memaudit run)
            log.info("watch: %s: %s; skipping it (the next watch finds it done)", name, exc)
            report.skipped_locked.append(name)
            return
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the others
            log.exception("watch: auditing %s failed", name)
            report.failed[name] = f"{type(exc).__name__}: {exc}"
            return
        state.write(f"{name}.json", {"checkpoint": str(checkpoint), "signature": signature(checkpoint), "run": run})
        report.audited.append(name)


def _audit(cfg: AuditConfig, address: str | None) -> str:
    from audit.pipeline import run_audit

    result = run_audit(cfg, address=address, report=True, command="memaudit watch")  # the report: under the lease
    failed = {**result.generation.shards_failed, **result.embeddings.shards_failed, **result.detection.shards_failed}
    if failed:
        raise RuntimeError(f"{len(failed)} shards failed (e.g. {next(iter(failed.items()))}); it is retried next time")
    return result.location


def _compare_pair(state: WatchState, previous: str, name: str, fail_if_new: bool, max_rate_increase: float | None,
                  report: WatchReport) -> None:
    from audit.report.compare import compare_runs, default_out, gate, write_compare

    a, b = state.read(f"{previous}.json"), state.read(f"{name}.json")
    if a is None or b is None:
        return
    run_a, run_b = str(a["run"]), str(b["run"])
    done = state.read(f"{name}.compared.json")
    if done is not None and done.get("runs") == [run_a, run_b]:
        return
    try:
        result = compare_runs(run_a, run_b)
    except InputError as exc:  # detected with other thresholds (e.g. a recalibrated reference): no gate to apply
        report.gate_failures[name] = [f"not comparable with {previous}: {exc}"]
        return
    out = write_compare(result, default_out(run_b, result))
    reasons = gate(result, fail_if_new, max_rate_increase)
    summary = {"runs": [run_a, run_b], "compare": str(out), "previous": previous,
               "newly_memorized": len(result["newly_memorized"]),
               "no_longer_memorized": len(result["no_longer_memorized"]), "gate": reasons}
    state.write(f"{name}.compared.json", summary)
    report.compared[name] = summary
    if reasons:
        report.gate_failures[name] = reasons
