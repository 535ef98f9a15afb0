"""Screening (docs/screening.md): how much faster than the full audit, how good at finding memorized prompts,
what the two-stage audit (screen, then the full audit of the escalated prompts only) keeps of the
full audit's findings, the driver's memory at scale, and the SD1.5 roofline.

Parts (``--parts``, default all four):

- ``audit``: for each testbed (``--testbeds``; ground truth as in benchmarks/detection.py), on
  ``--per-group`` captions of each group, at the default settings (``--samples`` 4 x ``--steps``
  20, the testbed as model and reference), three real runs in one process on one local Ray:
  ``run_screen`` (timed), ``run_audit`` with the same ``screen:`` section (goes on from that screen:
  generation, embedding, join and detection of the escalated prompts only), and ``run_audit``
  without a screen (timed). Prints the end-to-end throughput of the screen vs the full audit
  (target >= 40x), the AUC and TPR@1%FPR of each screen signal and of the two-stage and full
  audits' flag tests (memorized = duplicated >= ``--memorized-min`` times, not memorized = seen once
  or held out), the share of the full audit's flagged prompts the two-stage audit flags too
  (target >= 0.95), the ratio of denoiser calls and the funnel. ``--top`` / ``--threshold`` set the
  escalation (default: the config's, screen.threshold 2.0), ``--max-samples`` adaptive rounds of the
  two-stage audit (mean samples per escalated prompt), ``--screen-steps`` the latent-update signal;
  other rules' share and call ratio are
  derived from the same runs (the core's ``decide`` on the run's signals). ``--work DIR`` keeps the runs.
- ``stage``: the pure stages in this process, no Ray, no Parquet: ``ScreenStage`` seeds/s vs
  ``GenerateStage`` images/s (PNGs included) on the testbed, so the end-to-end overheads show.
- ``scale``: ``memaudit screen`` on ``--scale`` synthetic distinct prompts with ``builtin:tiny``
  (small steps and images, ``screen.seeds`` 1, big ``screen.prompts_per_shard``), each size in a
  fresh driver process with its own local Ray: the driver's peak RSS (its own ru_maxrss, as in
  benchmarks/memory.py) at N/10 and at N (target: within +10%). Not benchmarks/local_cluster.py's
  ``ray start`` cluster: its ``ray stop --force`` ends every Ray process on the machine.
- ``roofline``: screening prompts/s of ``--arch`` (``sd15`` on a GPU: the SD1.5 architecture with
  random weights, bf16) in the stage and through ``run_screen``, and the share of the bf16 roofline
  its FLOPs allow (FLOPs counted by benchmarks/flops.py: per screened prompt, seeds x (2 CFG
  denoiser calls + the text encoder)). On a CPU the same code runs with ``--arch tiny`` and reports
  GFLOP/s instead.

    python benchmarks/screen.py                                     # CPU profile: both testbeds, 16/group
    python benchmarks/screen.py --per-group 8 --scale 20000         # run_all.py's CPU entry (~10 min, 2 cores)
    python benchmarks/screen.py --profile gpu                       # GPU: --scale 100000, SD1.5 roofline
    python benchmarks/screen.py --parts audit --testbeds testbed --per-group 8 --top 0.5
    python benchmarks/screen.py --parts roofline stage --arch tiny --roofline-prompts 2 --stage-prompts 1 --no-ray

On a CPU shared with other work, set ``OMP_NUM_THREADS=1``: torch's default threads spin against the
other process (the testbed generated 0.3 images/s with 2 threads vs 5 with 1 on a busy 2-core VM);
Ray's workers inherit it, so both sides of every ratio run alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from detection import roc_auc, testbed_truth, tpr_at_fpr

PARTS = ("audit", "stage", "scale", "roofline")
SCREEN_SIGNALS = {  # method label -> (prompt_scores column of the two-stage run, sign)
    "screen: noise magnitude (Wen et al., first step)": ("screen_noise_magnitude", 1),
    "screen: alignment (Asthana & Belagiannis, low noise)": ("screen_alignment", 1),
    "screen: latent update (Huang et al., screen.steps)": ("screen_latent_update", 1),
    "screen: screen_score (mean robust z)": ("screen_score", 1),
}
TWO_STAGE = "two-stage audit: flag test (-log p-value)"
FULL = "full audit: flag test (-log p-value)"
PROFILES = {  # defaults per profile; every one can be given on the command line
    "cpu": {"scale": 20_000, "arch": "tiny", "size": None, "roofline_prompts": 8, "roofline_batch_size": 8,
            "roofline_steps": 20},
    "gpu": {"scale": 100_000, "arch": "sd15", "size": 512, "roofline_prompts": 256, "roofline_batch_size": 16,
            "roofline_steps": 50},
}
COUNTING_RULE = ("denoiser calls are counted per row: one CFG denoiser call (unconditional + text halves) on a "
                 "batch of B rows counts B. Screen: the batch-level calls its workers recorded in the screen/ "
                 "markers (first informative step + the low-noise call) x compute.batch_size (the rows each call "
                 "ran, padding included). Generation, two-stage and full: generation.steps x each prompt's n_samples in "
                 "prompt_scores (= steps x samples x prompts for the full audit without adaptive rounds; PNDM's "
                 "extra warm-up call and batch padding are not counted).")


# ---------------------------------------------------------------------------------------------
# configs and runs


def _overrides(work: Path, testbed: str, prompts: Path, samples: int, steps: int) -> list[str]:
    """What benchmarks/detection.py's ``audit`` sets, with the config's default calibration."""
    return [f"run.root={work / 'runs'}", f"prompts.source={prompts}", f"model.path=builtin:{testbed}",
            f"generation.samples_per_prompt={samples}", f"generation.steps={steps}",
            f"reference.path=builtin:{testbed}", "generation.prompts_per_shard=8"]


def _screen_overrides(seeds: int | None, threshold: str | None, top: str | None) -> list[str]:
    out = ["screen.prompts_per_shard=256"]  # the section's default; any screen.* override turns screening on
    if seeds is not None:
        out.append(f"screen.seeds={seeds}")
    if threshold is not None:
        out.append(f"screen.threshold={threshold}")
    if top is not None:
        out.append(f"screen.top={top}")
    return out


def _timed(call: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - start


def _markers(run: Path, table: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run / table / "_markers").glob("*.json"))]


def _window(markers: list[dict[str, Any]]) -> float:
    """First shard start to last shard finish, as the workers recorded them."""
    return max(m["finished_at"] for m in markers) - min(m["started_at"] for m in markers) if markers else 0.0


def run_testbed(work: Path, testbed: str, captions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The three runs of one testbed (screen, two-stage, full) plus the extra screen-only runs."""
    from audit.config import load_config
    from audit.embed.models import model_id_of
    from audit.pipeline import run_audit, run_screen
    from audit.pipeline.reference import audit_thresholds, prepare_reference

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    base = _overrides(work, testbed, prompts, args.samples, args.steps)
    full_cfg = load_config(None, base)
    rounds = [f"generation.max_samples_per_prompt={args.max_samples}"] if args.max_samples else []
    rounds += [f"screen.steps={args.screen_steps}"] if args.screen_steps else []
    two_cfg = load_config(None, base + _screen_overrides(args.seeds, args.threshold, args.top) + rounds)
    # not timed: a built-in reference is built and calibrated on first use (the maps one is not shipped built)
    audit_thresholds(full_cfg, prepare_reference(f"builtin:{testbed}"), model_id_of(full_cfg.embedding))

    screened, screen_s = _timed(run_screen, two_cfg)
    if screened.escalation is None:
        raise SystemExit(f"{testbed}: screen shards failed: {screened.screen.shards_failed}")
    print(f"{testbed}: screen of {len(captions)} prompts in {screen_s:.1f} s; escalated {screened.escalation}",
          flush=True)
    extra = {}
    for seeds in args.also_seeds:
        if seeds == two_cfg.screen.seeds:
            continue
        cfg = load_config(None, base + _screen_overrides(seeds, args.threshold, args.top))
        other, seconds = _timed(run_screen, cfg)
        extra[seeds] = {"seconds": seconds, "window_s": _window(_markers(other.run_path, "screen"))}
        print(f"{testbed}: screen with screen.seeds={seeds} in {seconds:.1f} s", flush=True)
    two, rest_s = _timed(run_audit, two_cfg)
    print(f"{testbed}: two-stage audit went on from the screen in {rest_s:.1f} s", flush=True)
    full, full_s = _timed(run_audit, full_cfg)
    print(f"{testbed}: full audit in {full_s:.1f} s", flush=True)
    assert two.run_path == screened.run_path, "run_audit did not go on from run_screen's run folder"
    return {"screen_run": screened.run_path, "full_run": full.run_path, "screen_s": screen_s,
            "two_stage_rest_s": rest_s, "full_s": full_s, "extra_seeds": extra,
            "seeds": two_cfg.screen.seeds, "batch_size": two_cfg.compute.batch_size,
            "threshold": two_cfg.screen.threshold, "top": two_cfg.screen.top}


# ---------------------------------------------------------------------------------------------
# evaluation (pure: reads finished runs)


def _value(row: dict[str, Any], column: str, sign: int) -> float:
    v = row.get(column)
    return -np.inf if v is None or (isinstance(v, float) and np.isnan(v)) else sign * float(v)


def _evidence(row: dict[str, Any]) -> float:
    """detection.py's "flag test (-log p-value)"; a prompt the screen did not escalate has p_value 1."""
    return -math.log10(max(float(row["p_value"]), 1e-300))


def evaluate(runs: dict[str, Any], truth: dict[str, tuple[str, int]], memorized_min: int,
             steps: int, samples: int) -> dict[str, Any]:
    """Detection quality, two-stage vs full, the funnel and throughput of one testbed's runs."""
    two = {r["prompt_id"]: r for r in pq.read_table(runs["screen_run"] / "prompt_scores").to_pylist()}
    full = {r["prompt_id"]: r for r in pq.read_table(runs["full_run"] / "prompt_scores").to_pylist()}
    assert set(two) == set(full), "the two-stage and full audits scored different prompts"
    ids = sorted(two, key=lambda p: (truth[p][1], p))
    pos = [p for p in ids if truth[p][1] >= memorized_min]
    neg = [p for p in ids if truth[p][1] <= 1]
    methods: dict[str, dict[str, float]] = {}

    def add(name: str, score: Any) -> None:
        a, b = np.array([score(p) for p in pos]), np.array([score(p) for p in neg])
        methods[name] = {"auc": roc_auc(a, b), "tpr@1%fpr": tpr_at_fpr(a, b)}

    for name, (column, sign) in SCREEN_SIGNALS.items():
        if column == "screen_latent_update" and all(two[p].get(column) is None for p in ids):
            continue  # screen.steps 1: not measured
        add(name, lambda p, c=column, s=sign: _value(two[p], c, s))
    add(TWO_STAGE, lambda p: _evidence(two[p]))
    add(FULL, lambda p: _evidence(full[p]))

    escalated = [p for p in ids if two[p]["escalated"]]
    full_flagged = {p for p in ids if full[p]["flagged"]}
    two_flagged = {p for p in ids if two[p]["flagged"]}
    n_samples = [int(two[p]["n_samples"]) for p in escalated]
    screen_markers = _markers(runs["screen_run"], "screen")
    screen_calls = sum(int(m["denoiser_calls"]) * int(m["batch_size"]) for m in screen_markers)
    generation_calls = steps * sum(int(r["n_samples"]) for r in two.values())
    # steps x samples x prompts while every prompt gets generation.samples_per_prompt; from n_samples so
    # that it stays right with adaptive rounds (generation.max_samples_per_prompt)
    full_calls = steps * sum(int(r["n_samples"]) for r in full.values())
    # the screen reads each seed's first-step noise magnitude as generation records it for that sample
    pairs = [(two[p]["screen_noise_magnitude"], full[p]["noise_magnitude"]) for p in ids]
    rel = [abs(a - b) / abs(b) for a, b in pairs if a is not None and b is not None and b != 0]
    groups = {}
    for group in sorted({truth[p][0] for p in ids}, key=_group_order):
        members = [p for p in ids if truth[p][0] == group]
        groups[group] = {"prompts": len(members), "escalated": sum(bool(two[p]["escalated"]) for p in members),
                         "flagged_two_stage": len(two_flagged & set(members)),
                         "flagged_full": len(full_flagged & set(members))}
    n = len(ids)
    full_s, screen_s = runs["full_s"], runs["screen_s"]
    two_stage_s = screen_s + runs["two_stage_rest_s"]
    throughput = {
        "prompts": n, "screen_s": screen_s, "full_s": full_s, "two_stage_s": two_stage_s,
        "screen_prompts_per_s": n / screen_s, "full_prompts_per_s": n / full_s, "ratio": full_s / screen_s,
        "two_stage_speedup": full_s / two_stage_s,
        "screen_window_s": _window(screen_markers), "generation_window_s": _window(_markers(runs["full_run"], "samples")),
        "full_detection_window_s": _window(_markers(runs["full_run"], "prompt_scores")),
        "extra_seeds": {str(k): {**v, "prompts_per_s": n / v["seconds"], "ratio": full_s / v["seconds"]}
                        for k, v in runs["extra_seeds"].items()},
    }
    return {
        "methods": methods, "positives": len(pos), "negatives": len(neg), "groups": groups,
        "throughput": throughput,
        "escalation": {"seeds": runs["seeds"], "threshold": runs["threshold"], "top": runs["top"]},
        "funnel": {"screened": n, "escalated": len(escalated), "flagged_two_stage": len(two_flagged),
                   "flagged_full": len(full_flagged)},
        "recall_of_full_flags": (len(full_flagged & two_flagged) / len(full_flagged)) if full_flagged else None,
        "full_flags_kept": len(full_flagged & two_flagged),
        "flagged_only_two_stage": len(two_flagged - full_flagged),
        "mean_samples_per_escalated": float(np.mean(n_samples)) if n_samples else 0.0,
        "denoiser_calls": {"screen": screen_calls, "screen_nominal": 2 * runs["seeds"] * n,
                           "two_stage_generation": generation_calls, "two_stage": screen_calls + generation_calls,
                           "full": full_calls, "full_nominal": steps * samples * len(ids),
                           "ratio": (screen_calls + generation_calls) / full_calls},
        "noise_magnitude_max_rel_diff": max(rel) if rel else None,
        "sweep": sweep(ids, two, full, full_flagged, screen_calls, steps, full_calls,
                       (runs["threshold"], runs["top"]), {p for p in ids if two[p]["escalated"]}),
    }


SWEEP = [(2.0, None), (1.0, None), (0.5, None), (0.0, None), (None, 0.1), (None, 0.25), (None, 0.5)]


def sweep(ids: list[str], two: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]], full_flagged: set[str],
          screen_calls: int, steps: int, full_calls: int, used: tuple[float | None, Any],
          escalated: set[str]) -> list[dict[str, Any]]:
    """Other escalation rules on the same screen, derived without running them: the core's own
    ``decide`` on the run's signals gives each rule's escalated prompts, and an escalated prompt's
    flag and samples are the full audit's (same seeds, same samples: the two-stage audit flags no
    prompt the full audit does not, which the run above checks)."""
    from audit.screen.escalate import decide

    noise = np.array([np.nan if two[p]["screen_noise_magnitude"] is None else two[p]["screen_noise_magnitude"]
                      for p in ids], np.float64)
    align = np.array([np.nan if two[p]["screen_alignment"] is None else two[p]["screen_alignment"] for p in ids],
                     np.float64)
    update = np.array([np.nan if two[p].get("screen_latent_update") is None else two[p]["screen_latent_update"]
                       for p in ids], np.float64)
    out = []
    for threshold, top in [used] + [rule for rule in SWEEP if rule != used]:
        table = decide(ids, noise, align, threshold, top, update)
        chosen = {p for p, up in zip(table.column("prompt_id").to_pylist(), table.column("escalated").to_pylist())
                  if up}
        out.append({"threshold": threshold, "top": top, "escalated": len(chosen), "configured": (threshold, top) == used,
                    "reproduces_run": chosen == escalated if (threshold, top) == used else None,
                    "full_flags_kept": len(chosen & full_flagged),
                    "share": len(chosen & full_flagged) / len(full_flagged) if full_flagged else None,
                    "calls_ratio": (screen_calls + steps * sum(int(full[p]["n_samples"]) for p in chosen)) / full_calls})
    return out


def _group_order(g: str) -> tuple[bool, bool, int]:
    return (g == "heldout", g == "single", -int(g[3:]) if g.startswith("dup") else 0)


def print_testbed(testbed: str, r: dict[str, Any], memorized_min: int) -> None:
    t, calls, f = r["throughput"], r["denoiser_calls"], r["funnel"]
    e = r["escalation"]
    print(f"\n## {testbed}\n")
    print(f"escalation: screen.threshold={e['threshold']}, screen.top={e['top']} (either escalates), "
          f"screen.seeds={e['seeds']}\n")
    print("| method | AUC | TPR@1%FPR |")
    print("|---|---:|---:|")
    for name, m in r["methods"].items():
        print(f"| {name} | {m['auc']:.3f} | {m['tpr@1%fpr']:.3f} |")
    print(f"\n({r['positives']} memorized prompts, duplicated >= {memorized_min}x; {r['negatives']} not memorized, "
          "1x or held out; groups between are left out)")
    print("\n| group | prompts | escalated | flagged two-stage | flagged full audit |")
    print("|---|---:|---:|---:|---:|")
    for g, row in r["groups"].items():
        print(f"| {g} | {row['prompts']} | {row['escalated']} | {row['flagged_two_stage']} | {row['flagged_full']} |")
    recall = r["recall_of_full_flags"]
    print(f"\nfunnel: {f['screened']} screened -> {f['escalated']} escalated -> {f['flagged_two_stage']} flagged "
          f"(the full audit flags {f['flagged_full']})")
    print(f"full audit's flagged prompts also flagged by the two-stage audit: {r['full_flags_kept']}/{f['flagged_full']}"
          f" = {'n/a' if recall is None else f'{recall:.3f}'} (target >= 0.95); flagged by the two-stage audit "
          f"only: {r['flagged_only_two_stage']}")
    print(f"mean samples per escalated prompt: {r['mean_samples_per_escalated']:.2f}")
    print(f"denoiser calls (prompt-calls): two-stage {calls['two_stage']:,} = screen {calls['screen']:,} "
          f"(nominal 2 x seeds x prompts: {calls['screen_nominal']:,}) + generation {calls['two_stage_generation']:,}; "
          f"full audit {calls['full']:,} (nominal steps x samples x prompts: {calls['full_nominal']:,}); "
          f"ratio {calls['ratio']:.3f}")
    print("\nother escalation rules on the same screen (derived with the core's `decide` on this run's signals; an "
          "escalated prompt's flag is the full audit's, same seeds):\n")
    print("| screen.threshold | screen.top | escalated | full audit's flags kept | share | denoiser-call ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for row in r["sweep"]:
        share = "n/a" if row["share"] is None else f"{row['share']:.3f}"
        note = " (configured; reproduces the run)" if row["reproduces_run"] else \
            " (configured; DIFFERS from the run)" if row["configured"] else ""
        print(f"| {row['threshold']} | {row['top']}{note} | {row['escalated']} | {row['full_flags_kept']}/"
              f"{r['funnel']['flagged_full']} | {share} | {row['calls_ratio']:.3f} |")
    diff = r["noise_magnitude_max_rel_diff"]
    if diff is not None:
        print(f"check: the screen's noise magnitude vs the full audit's (same seeds, first step): max relative "
              f"difference {diff:.2e}")
    print(f"\nthroughput, end to end ({t['prompts']} prompts): screen {t['screen_s']:.1f} s = "
          f"{t['screen_prompts_per_s']:.3f} prompts/s; full audit {t['full_s']:.1f} s = {t['full_prompts_per_s']:.4f} "
          f"prompts/s; ratio {t['ratio']:.1f}x (target >= 40x); two-stage audit {t['two_stage_s']:.1f} s "
          f"(screen + the rest; speed-up over the full audit {t['two_stage_speedup']:.2f}x)")
    for seeds, v in t["extra_seeds"].items():
        print(f"  screen.seeds={seeds}: {v['seconds']:.1f} s = {v['prompts_per_s']:.3f} prompts/s, {v['ratio']:.1f}x "
              f"the full audit")
    steady = t["generation_window_s"] / t["screen_window_s"] if t["screen_window_s"] else float("nan")
    print(f"busy windows (first shard start to last shard end, as the workers recorded them; worker start and "
          f"model load excluded): screen {t['screen_window_s']:.1f} s, full audit's generation (with embedding; "
          f"join and detection not included) {t['generation_window_s']:.1f} s: {steady:.1f}x, the ratio the "
          "end-to-end one tends to as the prompts grow past the fixed start-up costs")


# ---------------------------------------------------------------------------------------------
# the pure stages


def _rows(captions: list[str], per_prompt: int, seed: int) -> dict[str, np.ndarray]:
    from audit import ids
    from audit.plan import ShardSpec, shard_samples

    spec = ShardSpec(0, "bench", tuple(ids.prompt_id(c) for c in captions), tuple(captions))
    return shard_samples(spec, per_prompt, seed)


def _stage_rate(stage: Any, rows: dict[str, np.ndarray], batch_size: int) -> tuple[int, float]:
    """Rows and seconds through ``stage`` as a worker feeds it (audit.batching.run_batches), after
    one warm-up batch."""
    from audit.batching import run_batches

    warm = {k: v[:batch_size] for k, v in rows.items()}
    run_batches(stage, warm, lambda _: None, batch_size)
    start = time.perf_counter()
    run_batches(stage, rows, lambda _: None, batch_size)
    return len(rows["seed"]), time.perf_counter() - start


def stage_part(captions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from audit.config import load_config
    from audit.screen.screen_step import ScreenStage

    overrides = ["model.path=builtin:testbed", f"generation.steps={args.steps}", "reference.path=null",
                 f"generation.samples_per_prompt={args.samples}", *_screen_overrides(args.seeds, None, None)]
    cfg = load_config(None, overrides)
    stage = ScreenStage(cfg)
    seeds, batch = cfg.screen.seeds, cfg.compute.batch_size
    screen_prompts = captions[: args.stage_prompts]
    n_seed, s_seed = _stage_rate(stage, _rows(screen_prompts, seeds, cfg.run.seed), batch)
    gen_prompts = captions[: max(1, args.stage_images // args.samples)]
    n_img, s_img = _stage_rate(stage.generation, _rows(gen_prompts, args.samples, cfg.run.seed), batch)
    screen_pps, gen_pps = n_seed / s_seed / seeds, n_img / s_img / args.samples
    result = {"device": stage.device, "dtype": stage.dtype, "batch_size": batch, "seeds": seeds,
              "samples": args.samples, "steps": args.steps, "screen_seeds_per_s": n_seed / s_seed,
              "generate_images_per_s": n_img / s_img, "screen_prompts_per_s": screen_pps,
              "generate_prompts_per_s": gen_pps, "ratio": screen_pps / gen_pps}
    print(f"\n## pure stages (builtin:testbed, {stage.device} {stage.dtype}, batch {batch}, no Ray, no Parquet)\n")
    print("| stage | rows | seconds | rows/s | prompts/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| ScreenStage ({seeds} seeds per prompt) | {n_seed} seeds | {s_seed:.2f} | {n_seed / s_seed:.2f} seeds/s "
          f"| {screen_pps:.3f} |")
    print(f"| GenerateStage ({args.samples} samples x {args.steps} steps, PNGs) | {n_img} images | {s_img:.2f} | "
          f"{n_img / s_img:.3f} images/s | {gen_pps:.4f} |")
    print(f"ratio of prompts/s: {result['ratio']:.1f}x (CFG denoiser calls per prompt: screen 2 x {seeds} = "
          f"{2 * seeds}, generation {args.steps} x {args.samples} = {args.steps * args.samples}: "
          f"{args.steps * args.samples / (2 * seeds):.0f}x fewer)")
    return result


# ---------------------------------------------------------------------------------------------
# the driver's memory at scale


def run_driver(args: list[str], interval: float = 0.2) -> dict[str, Any]:
    """`memaudit ARGS` in a fresh process that starts its own local Ray (stopped with it: nothing
    else on the machine is touched): its exact peak RSS and the peak total RSS of its own Ray's
    actors (benchmarks/local_cluster.py's ``run_driver``, descendants only)."""
    import os

    from local_cluster import run_driver as measured

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    run = measured(args, env, interval, own_only=True)
    return {"code": run.code, "seconds": run.seconds, "output": run.output, "actors_peak_bytes": run.actors_peak_bytes,
            "driver_peak_bytes": run.driver_peak_bytes}


def scale_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from audit.testbed.checkpoints import builtin_checkpoint

    builtin_checkpoint("tiny")  # built here once, not in the first measured driver
    sizes = [max(1, args.scale // 10), args.scale]
    results = []
    for n in sizes:
        prompts = work / f"scale-{n}.txt"
        prompts.write_text("".join(f"screen scale prompt {i}, a photograph of thing {i * 7919 % 100003}\n"
                                   for i in range(n)))
        run = run_driver(["-q", "screen", "--set", f"run.root={work / 'scale-runs'}", "--set", "model.path=builtin:tiny",
                          "--set", f"prompts.source={prompts}", "--set", "reference.path=null",
                          "--set", f"generation.steps={args.scale_steps}",
                          "--set", f"generation.height={args.scale_size}",
                          "--set", f"generation.width={args.scale_size}",
                          "--set", f"compute.batch_size={args.scale_batch_size}",
                          "--set", "screen.seeds=1",
                          "--set", f"screen.prompts_per_shard={args.scale_prompts_per_shard}"])
        if run["code"] != 0:
            raise SystemExit(f"memaudit screen failed at {n} prompts:\n{run['output'][-3000:]}")
        found = re.search(r"escalated: (\d+) of (\d+) prompts", run["output"])
        if not found or int(found[2]) != n:
            raise SystemExit(f"memaudit screen did not screen all {n} prompts:\n{run['output'][-3000:]}")
        results.append({"prompts": n, "screened": int(found[2]), "escalated": int(found[1]), "seconds": run["seconds"],
                        "prompts_per_s": n / run["seconds"], "driver_peak_mib": run["driver_peak_bytes"] / 2**20,
                        "actors_peak_mib": run["actors_peak_bytes"] / 2**20})
        print(f"scale: {n:,} prompts screened in {run['seconds']:.0f} s, driver peak "
              f"{results[-1]['driver_peak_mib']:.0f} MiB", flush=True)
    ratio = results[1]["driver_peak_mib"] / results[0]["driver_peak_mib"]
    print(f"\n## scale: `memaudit screen`, builtin:tiny, {args.scale_size}² images, {args.scale_steps} steps, "
          f"screen.seeds 1, batch {args.scale_batch_size}, {args.scale_prompts_per_shard} prompts per shard, "
          "a fresh driver (and its own local Ray) per size\n")
    print("| prompts | screened | escalated | seconds (whole command) | prompts/s | driver peak RSS | "
          "actors' peak total RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['prompts']:,} | {r['screened']:,} | {r['escalated']:,} | {r['seconds']:.0f} | "
              f"{r['prompts_per_s']:.0f} | {r['driver_peak_mib']:.0f} MiB | {r['actors_peak_mib']:.0f} MiB |")
    print(f"driver peak RSS at {sizes[1]:,} vs {sizes[0]:,} prompts: {ratio:.3f}x ({100 * (ratio - 1):+.1f}%; "
          "target <= +10%)")
    return {"results": results, "driver_ratio": ratio}


# ---------------------------------------------------------------------------------------------
# the roofline (GPU profile; the same code on CPU with --arch tiny)


def roofline_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from audit.config import load_config
    from audit.screen.screen_step import ScreenStage
    from flops import count

    if args.arch == "tiny":
        checkpoint = "builtin:tiny"
    else:
        from generation import _checkpoint

        checkpoint = _checkpoint(args.arch, work)
    prompts = [f"roofline prompt number {i}, a photograph" for i in range(args.roofline_prompts)]
    (work / "roofline.txt").write_text("\n".join(prompts) + "\n")
    cfg = load_config(None, [f"run.root={work / 'roofline-runs'}", f"model.path={checkpoint}",
                             f"prompts.source={work / 'roofline.txt'}", "reference.path=null",
                             f"generation.steps={args.roofline_steps}", f"model.device={args.device}",
                             f"compute.batch_size={args.roofline_batch_size}",
                             *([f"generation.height={args.size}", f"generation.width={args.size}"] if args.size else []),
                             *_screen_overrides(args.seeds, None, None)])
    stage = ScreenStage(cfg)
    seeds, device_used = cfg.screen.seeds, f"{stage.device} {stage.dtype}"
    n_rows, seconds = _stage_rate(stage, _rows(prompts, seeds, cfg.run.seed), cfg.compute.batch_size)
    del stage
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    stage_pps = n_rows / seconds / seeds
    counted = count(args.arch, args.roofline_steps, args.size)
    per_row = 2 * counted["flops_per_step"] + counted["flops"]["text_encoder"]  # a CFG call is batch 2 per row
    per_prompt = seeds * per_row
    result: dict[str, Any] = {"arch": args.arch, "device": device_used, "image_side": counted["image_side"],
                              "seeds": seeds, "batch_size": cfg.compute.batch_size, "prompts": len(prompts),
                              "flops_per_prompt": per_prompt, "stage_prompts_per_s": stage_pps,
                              "generation_flops_per_prompt": args.samples * counted["flops_per_image"]}
    rates = {"stage": stage_pps}
    if not args.no_ray:
        from audit.pipeline import run_screen

        screened, wall = _timed(run_screen, cfg)
        window = _window(_markers(screened.run_path, "screen"))
        rates["run_screen (busy window)"] = len(prompts) / window
        rates["run_screen (wall)"] = len(prompts) / wall
        result |= {"run_screen_s": wall, "run_screen_window_s": window, "ray_prompts_per_s": len(prompts) / window}
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    result["device_name"] = device
    print(f"\n## roofline: {args.arch} at {counted['image_side']}², screen.seeds {seeds}, batch "
          f"{cfg.compute.batch_size}, {len(prompts)} prompts, on {device}\n")
    print(f"FLOPs per screened prompt (counted): {seeds} seeds x (2 CFG {counted['denoiser']} calls + text encoder) = "
          f"{per_prompt / 1e9:.2f} GFLOP; generating {args.samples} samples x {args.roofline_steps} steps costs "
          f"{result['generation_flops_per_prompt'] / per_prompt:.0f}x that")
    if on_gpu:
        limit = args.peak_tflops * 1e12 / per_prompt
        result |= {"peak_tflops": args.peak_tflops, "roofline_prompts_per_s": limit,
                   "stage_fraction_of_roofline": stage_pps / limit}
        if "ray_prompts_per_s" in result:
            result["ray_fraction_of_roofline"] = result["ray_prompts_per_s"] / limit
        print(f"roofline at {args.peak_tflops:.0f} TFLOP/s: {limit:.1f} prompts/s")
        print("| path | prompts/s | % of bf16 roofline |")
        print("|---|---:|---:|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.2f} | {100 * rate / limit:.1f}% |")
    else:
        print("| path | prompts/s | GFLOP/s |")
        print("|---|---:|---:|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.2f} | {rate * per_prompt / 1e9:.1f} |")
    return result


# ---------------------------------------------------------------------------------------------


def _per_group_captions(testbed: str, per_group: int) -> tuple[list[str], dict[str, tuple[str, int]]]:
    table = testbed_truth(testbed)
    truth = {r["prompt_id"]: (r["group"], r["duplicates"]) for r in table}
    captions: list[str] = []
    for group in sorted({r["group"] for r in table}):
        captions += [r["caption"] for r in table if r["group"] == group][:per_group]
    return captions, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                        help="defaults of --scale, --arch, --size and the roofline sizes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--testbeds", nargs="+", default=["testbed", "testbed-maps"])
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memorized-min", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=None, help="screen.seeds (default: the config's, 4)")
    parser.add_argument("--also-seeds", type=int, nargs="*", default=[1],
                        help="screen-only runs at these screen.seeds too, for the throughput table")
    parser.add_argument("--threshold", default=None, help="screen.threshold (a number, or null; default 2.0)")
    parser.add_argument("--top", default=None, help="screen.top: a count (10) or a fraction (0.25); default none")
    parser.add_argument("--screen-steps", type=int, default=None,
                        help="screen.steps of the two-stage audit (> 1: Huang et al.'s latent updates join the score)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="two-stage audit: adaptive rounds up to this many samples per escalated prompt "
                             "(generation.max_samples_per_prompt; default: one round)")
    parser.add_argument("--stage-prompts", type=int, default=8, help="prompts screened in the pure-stage figure")
    parser.add_argument("--stage-images", type=int, default=16, help="images generated in the pure-stage figure")
    parser.add_argument("--scale", type=int, default=None, help="prompts of the scale run (also N/10)")
    parser.add_argument("--scale-steps", type=int, default=2)
    parser.add_argument("--scale-size", type=int, default=8, help="image side of the scale run (the tiny model)")
    parser.add_argument("--scale-batch-size", type=int, default=256)
    parser.add_argument("--scale-prompts-per-shard", type=int, default=10_000)
    parser.add_argument("--arch", default=None, choices=["tiny", "testbed", "sd15"])
    parser.add_argument("--size", type=int, default=None, help="image side of the roofline run")
    parser.add_argument("--roofline-prompts", type=int, default=None)
    parser.add_argument("--roofline-batch-size", type=int, default=None)
    parser.add_argument("--roofline-steps", type=int, default=None)
    parser.add_argument("--device", default="auto", help="model.device of the roofline run")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak of the accelerator")
    parser.add_argument("--no-ray", action="store_true", help="roofline: the stage only, no run_screen")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs in this folder (default: a temporary "
                                                                   "one, removed at the end)")
    args = parser.parse_args()
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING)

    result: dict[str, Any] = {"profile": args.profile,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="memaudit-screen-") as tmp:
        work = Path(tmp) if args.work is None else args.work
        if "audit" in args.parts:
            from audit.pipeline import connect

            connect(None)  # one local Ray for every run (each run still starts its own workers)
            result["testbeds"] = {}
            for testbed in args.testbeds:
                captions, truth = _per_group_captions(testbed, args.per_group)
                runs = run_testbed(work / testbed, testbed, captions, args)
                result["testbeds"][testbed] = evaluate(runs, truth, args.memorized_min, args.steps, args.samples)
            print(f"\n# screening vs the full audit: {args.per_group} captions per group, {args.samples} samples x "
                  f"{args.steps} steps; memorized = duplicated >= {args.memorized_min}x, not memorized = 1x or held "
                  "out\n")
            print(COUNTING_RULE)
            for testbed, r in result["testbeds"].items():
                print_testbed(testbed, r, args.memorized_min)
        if "stage" in args.parts:
            result["stage"] = stage_part(_per_group_captions("testbed", max(args.per_group, 8))[0], args)
        if "scale" in args.parts:
            result["scale"] = scale_part(args, work)
        if "roofline" in args.parts:
            result["roofline"] = roofline_part(args, work)

    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
