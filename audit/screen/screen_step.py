"""One screen/ shard, start to finish (Ray-free; see :mod:`audit.step` and docs/screening.md).

Each prompt is screened from ``screen.seeds`` initial noises, the seeds of its first samples
(:func:`audit.plan.shard_samples`), batched across prompts and seeds ``compute.batch_size`` rows
at a time with the same padding as generation, so a prompt's values do not depend on where it
falls in a shard, and its first-step noise magnitude for seed i is the one its sample i records.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from audit import layout
from audit.batching import Batch, run_batches
from audit.config import AuditConfig
from audit.location import Location
from audit.plan import ShardSpec, shard_samples
from audit.schema import SCREEN, STATUS_ERROR, STATUS_OK
from audit.screen.probe import ScreenDone, ScreenProbe
from audit.lease import LeaseCheck
from audit.store import RunStore

log = logging.getLogger(__name__)
TABLE = layout.SCREEN


class ScreenStage:
    """The generation stage's pipeline, stopped after the screen's denoiser calls: a batch of rows
    (``prompt``, ``seed``) in, per-row ``noise_magnitude`` and ``alignment`` out (NaN and the reason
    when the batch failed)."""

    def __init__(self, cfg: AuditConfig, device: str | None = None, dtype: str | None = None) -> None:
        from audit.generate.sampling import GenerateStage

        self.cfg = cfg
        self.generation = GenerateStage(cfg, device, dtype)
        self.device, self.dtype = self.generation.device, self.generation.dtype
        self.denoiser_calls = 0

    def __call__(self, batch: Batch) -> Batch:
        gen = self.generation
        n = len(batch["seed"])
        arguments = gen.call_arguments(batch, "latent")
        assert self.cfg.screen is not None
        probe = ScreenProbe(gen.denoiser, gen.pipe.scheduler, len(arguments["generator"]), gen.conversion,
                            gen.family.timestep_scale, self.cfg.screen.steps)
        error = None
        try:
            with torch.inference_mode(), probe:
                gen.pipe(**arguments)
            error = "the pipeline finished without an informative denoiser call (too few generation.steps?)"
        except ScreenDone:
            pass
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes error rows, never a lost shard
            log.exception("screening failed for a batch of %d rows", n)
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        self.denoiser_calls += probe.denoiser_calls
        update = probe.latent_update
        if error is None and (update is None) != (self.cfg.screen.steps == 1):
            error = f"the pipeline stopped before {self.cfg.screen.steps} steps (screen.steps > generation.steps?)"
        nan = np.full(n, np.nan, np.float32)
        if error is not None or probe.noise_magnitude is None or probe.alignment is None:
            return {"prompt_id": batch["prompt_id"], "noise_magnitude": nan, "alignment": nan.copy(),
                    "latent_update": nan.copy(), "error": np.array([error] * n, dtype=object)}
        return {"prompt_id": batch["prompt_id"],
                "noise_magnitude": probe.noise_magnitude[:n].cpu().numpy().astype(np.float32),
                "alignment": probe.alignment[:n].cpu().numpy().astype(np.float32),
                "latent_update": nan if update is None else update[:n].cpu().numpy().astype(np.float32),
                "error": np.array([None] * n, dtype=object)}


def per_prompt(order: list[str], seeds: int, parts: list[Batch]) -> dict[str, list[Any]]:
    """Rows of the screen/ table: each prompt's per-seed values and their means."""
    pids = np.concatenate([p["prompt_id"] for p in parts])
    noise = np.concatenate([p["noise_magnitude"] for p in parts])
    align = np.concatenate([p["alignment"] for p in parts])
    update = np.concatenate([p["latent_update"] for p in parts])
    errors = np.concatenate([p["error"] for p in parts])
    out: dict[str, list[Any]] = {name: [] for name in SCREEN.names}
    for k, prompt_id in enumerate(order):
        rows = slice(k * seeds, (k + 1) * seeds)
        assert all(p == prompt_id for p in pids[rows])
        failed = [e for e in errors[rows] if e is not None]
        out["prompt_id"].append(prompt_id)
        out["n_seeds"].append(seeds)
        out["noise_magnitude_seeds"].append([float(v) for v in noise[rows]])
        out["alignment_seeds"].append([float(v) for v in align[rows]])
        measured = not failed and bool(np.isfinite(update[rows]).all())
        out["latent_update_seeds"].append([float(v) for v in update[rows]] if measured else None)
        out["latent_update"].append(float(np.mean(update[rows], dtype=np.float64)) if measured else None)
        out["noise_magnitude"].append(None if failed else float(np.mean(noise[rows], dtype=np.float64)))
        out["alignment"].append(None if failed else float(np.mean(align[rows], dtype=np.float64)))
        out["status"].append(STATUS_ERROR if failed else STATUS_OK)
        out["error"].append(failed[0] if failed else None)
    return out


def screen_shard(stage: ScreenStage, store: RunStore, cfg: AuditConfig, shard: ShardSpec, **extra: Any) -> dict[str, Any]:
    """Screen every prompt of a shard and publish its screen/ shard; returns the marker."""
    assert cfg.screen is not None
    seeds = cfg.screen.seeds
    rows = shard_samples(shard, seeds, cfg.run.seed)
    parts: list[Batch] = []
    before = stage.denoiser_calls
    store.invalidate(TABLE, shard.name)
    # opened before the work, as generation does, so the marker's started_at is the shard's start
    # (StepReport.busy_s, the progress rate and benchmarks read the busy window from the markers)
    with store.open_shard(TABLE, shard.name, SCREEN) as writer:
        run_batches(stage, rows, parts.append, cfg.compute.batch_size)
        writer.write(per_prompt(list(shard.prompt_ids), seeds, parts))
        return writer.commit(**extra, denoiser_calls=stage.denoiser_calls - before)


class ScreenStep:
    """The screening step: one loaded pipeline; a task (a :class:`ShardSpec` of the screen's own
    shards) writes that shard of screen/."""

    def __init__(self, cfg: AuditConfig, run: Location, device: str, dtype: str,
                 lease: LeaseCheck | None = None) -> None:
        self.cfg, self.store = cfg, RunStore(run, lease)
        self.stage = ScreenStage(cfg, device, dtype)

    def describe(self) -> dict[str, Any]:
        return {"device": self.stage.device, "dtype": self.stage.dtype}

    def run(self, task: ShardSpec) -> dict[str, Any]:
        return screen_shard(self.stage, self.store, self.cfg, task, device=self.stage.device, dtype=self.stage.dtype,
                            batch_size=self.cfg.compute.batch_size)


__all__ = ["TABLE", "ScreenStage", "ScreenStep", "per_prompt", "screen_shard"]
