"""A prompt's screen signals while the service runs (Ray-free; docs/serving.md, "Prompt screen").

The audit's screen (:class:`audit.screen.screen_step.ScreenStage`) on one prompt or a few: the
same seeds (``run.seed`` and the prompt's id, as a run draws them), the same batching and padding,
so a prompt's noise magnitude, alignment and latent update here are the numbers the audit's
``screen/`` table records for it under the same config. A prompt's ``screen_score`` is the audit's
formula (:func:`audit.screen.escalate.screen_scores`) with the median and MAD of a **baseline**:
the config's prompts, screened once when the service starts, in place of the run's own prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from audit import ids
from audit.batching import Batch, run_batches
from audit.config import AuditConfig, ScreenSection
from audit.errors import InputError
from audit.plan import ShardSpec, plan_prompts, shard_samples
from audit.prompts import read_prompts
from audit.schema import STATUS_OK
from audit.screen.escalate import MIN_PROMPTS, screen_scores
from audit.screen.screen_step import ScreenStage, per_prompt


def _column(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    return np.array([np.nan if r[name] is None else r[name] for r in rows], np.float64)


Signals = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def _signals(rows: list[dict[str, Any]]) -> Signals:
    """The rows' noise magnitudes, alignments and latent updates (None: not measured)."""
    update = _column(rows, "latent_update")
    return _column(rows, "noise_magnitude"), _column(rows, "alignment"), update if np.isfinite(update).any() else None


class PromptScreener:
    """The audit's screen on prompts sent one at a time, scored against a baseline of prompts.
    ``cfg.screen`` must be set (the service fills in the defaults)."""

    def __init__(self, cfg: AuditConfig, baseline: list[str], device: str | None = None,
                 dtype: str | None = None) -> None:
        assert cfg.screen is not None
        self.cfg, self.seeds = cfg, cfg.screen.seeds
        self.stage = ScreenStage(cfg, device, dtype)
        rows = [r for r in self.signals(baseline) if r["status"] == STATUS_OK]
        if len(rows) < MIN_PROMPTS:
            raise InputError(f"the screen baseline has {len(rows)} measured prompts; at least {MIN_PROMPTS} are "
                             "needed for its median and MAD: point prompts.source at a caption list")
        self.baseline = _signals(rows)
        self.baseline_scores = np.sort(screen_scores(*self.baseline)[0])
        self.baseline_size = len(rows)

    def signals(self, prompts: list[str]) -> list[dict[str, Any]]:
        """Each prompt's ``screen/`` row (per-seed values, their means, status), in order."""
        texts = [ids.normalize_prompt(p) for p in prompts]
        prompt_ids = [ids.prompt_id(t) for t in texts]
        rows = shard_samples(ShardSpec(0, "serve", tuple(prompt_ids), tuple(texts)), self.seeds, self.cfg.run.seed)
        parts: list[Batch] = []
        run_batches(self.stage, rows, parts.append, self.cfg.compute.batch_size)
        table = per_prompt(prompt_ids, self.seeds, parts)
        return [{"prompt": text, **dict(zip(table, values))} for text, values in zip(texts, zip(*table.values()))]

    def screen(self, prompts: list[str]) -> list[dict[str, Any]]:
        """Each prompt's signals, their z-scores and ``screen_score`` against the baseline, the
        share of baseline prompts that score lower, and whether ``screen.threshold`` is passed."""
        rows = self.signals(prompts)
        score, z_noise, z_align, z_update = screen_scores(*_signals(rows), against=self.baseline)
        threshold = self.cfg.screen.threshold if self.cfg.screen else None
        out = []
        for i, row in enumerate(rows):
            measured = bool(np.isfinite(score[i]))
            value = lambda a: float(a[i]) if np.isfinite(a[i]) else None  # noqa: E731
            out.append(row | {
                "z_noise_magnitude": value(z_noise), "z_alignment": value(z_align),
                "z_latent_update": value(z_update), "screen_score": value(score),
                "baseline_quantile": (float(np.searchsorted(self.baseline_scores, score[i]) / self.baseline_size)
                                      if measured else None),
                "above_threshold": bool(measured and threshold is not None and score[i] >= threshold),
            })
        return out


def prepare_screen(cfg: AuditConfig, baseline_size: int) -> tuple[AuditConfig, list[str]]:
    """The config the service screens with (its ``screen:`` section, or the defaults), refused as
    ``memaudit screen`` refuses it (a model without an unconditional prediction, guidance ≤ 1, more
    screen steps than sampler steps), and the baseline: the first ``baseline_size`` of the config's
    planned prompts."""
    from audit.generate.loading import preflight
    from audit.screen.run_screen import check_screen

    if baseline_size < MIN_PROMPTS:
        raise InputError(f"--screen-baseline {baseline_size}: at least {MIN_PROMPTS} prompts are needed for the "
                         "baseline's median and MAD")
    if cfg.screen is None:
        cfg = cfg.model_copy(update={"screen": ScreenSection()})
    assert cfg.screen is not None
    _, info = preflight(cfg.model, cfg.generation)
    plan = plan_prompts(read_prompts(cfg.prompts), cfg.generation.prompts_per_shard, baseline_size)
    check_screen(cfg.screen, info.family, cfg.generation, plan.n_prompts)
    if plan.n_prompts < MIN_PROMPTS:
        raise InputError(f"prompts: {plan.n_prompts} distinct prompts for the screen's baseline; at least "
                         f"{MIN_PROMPTS} are needed: point prompts.source at a longer caption list")
    return cfg, plan.table.column("prompt").to_pylist()


__all__ = ["PromptScreener", "prepare_screen"]
