"""Every benchmark, one command: each prints its table and writes JSON; a summary follows.

    python benchmarks/run_all.py                    # sizes for a 2-core CPU machine (~1 h)
    python benchmarks/run_all.py --profile gpu      # full sizes, SD1.5 (and SDXL generation), on the GPU
    python benchmarks/run_all.py --only flops generation --out results/

Outputs go to ``--out`` (default ``benchmarks/results/<profile>-<time>/``): ``<name>.json`` and
``<name>.txt`` (the printed table) per benchmark, and ``summary.json`` with the headline figures,
the device and how long each took. A benchmark that fails is reported and the others still run.
A benchmark with no arguments for a profile (``generation_sdxl`` on the CPU) is not part of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> (arguments on a 2-core CPU, arguments on a GPU machine); None: not run in that profile
BENCHMARKS: dict[str, tuple[list[str] | None, list[str] | None]] = {
    "flops": (["--arch", "sd15", "--size", "512", "--steps", "50"], ["--arch", "sd15", "--size", "512", "--steps", "50"]),
    "generation": ([], ["--arch", "sd15", "--size", "512", "--steps", "50", "--batch-size", "16", "--prompts", "8",
                        "--samples", "32", "--channels-last"]),
    # SDXL base architecture with random weights at 1024², 32 images a path and round: GPU only (the
    # CPU check of this path is `generation.py --arch sdxl --tiny`, run by tests/test_benchmarks.py)
    "generation_sdxl": (None, ["--arch", "sdxl", "--size", "1024", "--steps", "50", "--batch-size", "8",
                               "--prompts", "4", "--samples", "8", "--channels-last"]),
    "end_to_end": ([], []),
    "reference": (["--vectors", "20000", "--train-sample", "5000", "--queries", "500"], ["--vectors", "1000000"]),
    "knn_join": (["--vectors", "200000", "--queries", "20000", "--train-sample", "50000", "--exact-queries", "2000"],
                 ["--nprobe", "8", "16"]),
    "embedding_storage": (["--rows", "50000"], []),
    "memory": ([], []),
    "scaling": ([], []),
    "detection": (["--per-group", "8", "--samples", "4", "16"], []),
    "object_store": ([], []),
    "denoiser_variants": ([], ["--arch", "sd15", "--size", "512", "--batch-size", "16"]),
    "cliques": ([], []),
    # each family's tiny checkpoint side by side, and Flux's extra unconditional call (CPU code paths)
    "families": ([], None),
    # screening (docs/screening.md): throughput vs the full audit, detection, two-stage vs full (the
    # testbeds are 40% memorized: escalate the top half, rounds up to 16), driver memory at scale;
    # the GPU profile adds the SD1.5 screening roofline and 100k prompts
    # driver-side steps (verify, report, compare, a no-op run, the notebook) on synthetic runs of
    # 10^5-10^7 samples against a DuckDB scan, and a bucket run of 10^6 (docs/architecture.md, "Scale")
    "scale": (["--s3-size", "1000000"], ["--s3-size", "1000000"]),
    "screen": (["--per-group", "8", "--scale", "20000", "--top", "0.5", "--max-samples", "16"], ["--profile", "gpu"]),
    # the check service (docs/serving.md) at 1, 8, 64 clients against the offline path, and the
    # search step alone at 10^6 reference vectors, Flat and IVF (2*10^5 on CPU: index builds)
    "serve": (["--seconds", "5", "--search-vectors", "200000"], ["--search-vectors", "1000000"]),
}
# benchmarks that run another benchmark's script with other arguments
SCRIPTS = {"generation_sdxl": "generation"}


def headline(name: str, result: dict[str, Any]) -> str:
    """One line per benchmark for the summary."""
    if name == "flops":
        return f"{result['tflop_per_image']:.2f} TFLOP/image; roofline {result['roofline_images_per_s']:.2f} img/s"
    if name in ("generation", "generation_sdxl"):
        line = (f"ray {result['ray_images_per_s']:.2f} img/s = {result['paired_ratio']:.3f}x the plain loop "
                f"(median of paired rounds; {result['ratio']:.3f}x of the medians)")
        if "ray_fraction_of_roofline" in result:
            line += f", {100 * result['ray_fraction_of_roofline']:.1f}% of the bf16 roofline"
        return line
    if name == "end_to_end":
        return (f"Ray + Parquet overhead {100 * result['overhead']:+.1f}% of pure model time ({result['samples']} "
                f"samples; {100 * result['overhead_after']:+.1f}% embedding after generation instead of during)")
    if name == "denoiser_variants":
        return ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup_vs_eager"].items() if k != "eager") + \
            f" the eager SDPA forward ({result['device']} {result['dtype']})"
    if name == "memory":
        last = result["results"][-1]
        return f"driver peak {100 * last['driver_vs_smallest']:+.1f}% from {result['results'][0]['samples']:,} to {last['samples']:,} samples"
    if name == "scaling":
        return "; ".join(f"{r['where']} x{r['workers']}: {r['images_per_s']:.2f} img/s (eff. {r['efficiency']:.2f})"
                         for r in result["results"])
    if name == "knn_join":
        best = max((v for v in result.values() if isinstance(v, dict)), key=lambda v: v["speedup_vs_exact"])
        return (f"join {best['queries_per_s']:.0f} q/s = {best['speedup_vs_exact']:.1f}x exact at recall@10 "
                f"{best['recall@10']:.3f} ({best['factory']}, nprobe {best['nprobe']})")
    if name == "reference":
        rates = ", ".join(f"{k} {v:.0f} img/s" for k, v in result.get("embedding_images_per_s", {}).items())
        index = result["index"]
        return f"embedding {rates}; {index['factory']} recall@10 {index['recall@10_rerank20']:.3f} re-ranked"
    if name == "embedding_storage":
        chosen = result["types"]["fixed_size_binary (chosen)"]
        return f"fixed_size_binary write {chosen['write_s']:.2f} s, read {chosen['read_s']:.2f} s"
    if name == "detection":
        parts = []
        for testbed, by_n in result.items():
            n = max(by_n, key=int)
            calibrated = by_n[n]["calibrated"]
            auc = calibrated["methods"]["flag test (-log p-value)"]["auc"]
            held = calibrated["groups"].get("heldout", {})
            parts.append(f"{testbed} n={n}: flag-test AUC {auc:.3f}, held out flagged "
                         f"{held.get('flagged_count')}/{held.get('prompts')}")
        return "; ".join(parts)
    if name == "object_store":
        return (f"S3 run root {result['s3_vs_local']:.3f}x the local-disk wall time ({result['samples']} samples, "
                f"{result['objects']} objects); no-op resume on an empty cache {result['resume_s']:.1f} s")
    if name == "cliques":
        graphs = list(result["graphs"].values())
        spans = {method: [g[key] for g in graphs if key in g] for method, key in
                 (("max_weight_clique", "nx_vs_hand"), ("find_cliques", "nx_enum_vs_hand"))}
        return ("networkx " + ", ".join(f"{m} {min(r):.1f}-{max(r):.1f}x" for m, r in spans.items() if r) +
                f" the hand-written search's time at {result['samples']} samples; same size on "
                f"{sum(g['agree'] for g in graphs)}/{len(graphs)} graphs")
    if name == "families":
        rates = ", ".join(f"{family} {row['images_per_s']:.1f}" for family, row in result["families"].items())
        return f"tiny img/s: {rates}; Flux extra uncond call {result['flux_extra_uncond_cost']:.3f}x the time"
    if name == "scale":
        t, big = result["targets"], result["results"][-1]
        return (f"at {big['samples']:,} samples: verify {big['verify']['seconds']:.0f} s "
                f"({t['verify_vs_floor']:.1f}x a DuckDB scan), report {big['report']['seconds']:.0f} s "
                f"({t['report_vs_floor']:.1f}x), no-op run {big['noop_run']['seconds']:.0f} s; peak RSS vs the "
                f"smallest run: verify {t['verify_rss_ratio']:.2f}x, report {t['report_rss_ratio']:.2f}x")
    if name == "screen":
        parts = []
        for testbed, r in result.get("testbeds", {}).items():
            t, recall = r["throughput"], r["recall_of_full_flags"]
            parts.append(f"{testbed}: screen {t['ratio']:.1f}x the full audit's prompts/s, two-stage keeps "
                         f"{'n/a' if recall is None else f'{recall:.2f}'} of its flags at "
                         f"{r['denoiser_calls']['ratio']:.2f}x the denoiser calls")
        if "scale" in result:
            top = result["scale"]["results"][-1]
            parts.append(f"driver peak {100 * (result['scale']['driver_ratio'] - 1):+.1f}% at {top['prompts']:,} "
                         "prompts vs a tenth")
        if "stage_fraction_of_roofline" in result.get("roofline", {}):
            parts.append(f"{result['roofline']['arch']} screening at "
                         f"{100 * result['roofline']['stage_fraction_of_roofline']:.1f}% of the bf16 roofline")
        return "; ".join(parts)
    if name == "serve":
        t = result["targets"]
        searches = ", ".join(f"{s['factory']} {s['batch1']['p50_ms']:.1f}" for s in result["search"])
        return (f"service at the most clients {t['service_vs_offline_at_most_clients']:.2f}x the offline images/s, "
                f"p99/p50 at one client {t['p99_over_p50_one_client']:.2f}; search at "
                f"{result['search'][0]['vectors']:,} vectors ({searches}) ms per image")
    return ", ".join(f"{k}" for k in list(result)[:4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpu = args.profile == "gpu"
    in_profile = [name for name, profiles in BENCHMARKS.items() if profiles[gpu] is not None]
    missing = sorted(set(args.only or ()) - set(in_profile))
    if missing:
        parser.error(f"not in the {args.profile} profile: {', '.join(missing)}")
    out = args.out or HERE / "results" / f"{args.profile}-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"profile": args.profile, "machine": platform.platform(), "benchmarks": {}}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    except ImportError:
        summary["device"] = "unknown"
    for name in args.only or in_profile:
        extra = BENCHMARKS[name][gpu] or []
        script = HERE / f"{SCRIPTS.get(name, name)}.py"
        command = [sys.executable, str(script), *extra, "--json", str(out / f"{name}.json")]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        with (out / f"{name}.txt").open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, check=False)
        seconds = time.perf_counter() - start
        entry: dict[str, Any] = {"seconds": round(seconds, 1), "ok": done.returncode == 0}
        if done.returncode == 0 and (out / f"{name}.json").is_file():
            entry["headline"] = headline(name, json.loads((out / f"{name}.json").read_text()))
        else:
            entry["error"] = (out / f"{name}.txt").read_text()[-2000:]
        summary["benchmarks"][name] = entry
        print(f"   {'ok' if entry['ok'] else 'FAILED'} in {seconds:.0f} s: {entry.get('headline', entry.get('error', '')[-300:])}",
              flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndevice: {summary['device']}; results in {out}")
    print("| benchmark | seconds | headline |")
    print("|---|---|---|")
    for name, entry in summary["benchmarks"].items():
        print(f"| {name} | {entry['seconds']:.0f} | {entry.get('headline', 'FAILED (see ' + name + '.txt)')} |")
    if not all(e["ok"] for e in summary["benchmarks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
