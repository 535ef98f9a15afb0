"""Detection quality on the shipped testbeds: prompt-level ROC AUC and TPR@1%FPR of every signal,
flagged shares and sample-level label rates per ground-truth group, with the papers' absolute
thresholds and with thresholds calibrated on the reference (docs/calibration.md), side by side.

For each testbed (``--testbeds``: ``testbed``, the glyph crops with PNDM; ``testbed-maps``, terrain
maps, a face photo, an MRI slice and flat images with DDIM) and each ``--samples`` setting, runs the
whole chain (`memaudit run`: generation on local Ray, embeddings, kNN join against the testbed's
training set, cliques, verification, scores) on ``--per-group`` captions of each group, once with
``detection.calibration: calibrated`` and once with ``paper`` (the second pass redoes detection
only: the samples are the same). Ground truth: memorized = captions duplicated >=
``--memorized-min`` times in training, not memorized = seen once or held out. AUC table in the
format of Jeon et al. (ICML 2025) Table 1.

    python benchmarks/detection.py                                   # both testbeds, 16/group, n = 4 and 16
    python benchmarks/detection.py --testbeds testbed --per-group 8 --samples 4 --steps 10   # quicker
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

SIGNALS = {
    "noise magnitude (Wen et al.)": ("noise_magnitude", 1),
    "largest clique / n (Carlini et al.)": ("clique_frac", 1),
    "best neighbour cosine (copy embedding)": ("best_cosine", 1),
    "best split-product (Somepalli et al.)": ("best_split_product", 1),
    "closest verified pixel copy (-tiled L2)": ("min_tiled_l2", -1),
    "memaudit score (combined)": ("score", 1),
    "flag test (-log p-value)": ("evidence", 1),
}
MODES = ("paper", "calibrated")
LABELS = ("matching_verbatim", "retrieved_verbatim", "template_verbatim", "low_information")


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> float:
    """Largest TPR at a threshold whose false-positive rate is <= ``fpr``."""
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    best = 0.0
    for t in thresholds:
        if (negative >= t).mean() <= fpr:
            best = max(best, float((positive >= t).mean()))
    return best


def audit(work: Path, testbed: str, captions: list[str], samples: int, steps: int, mode: str) -> Path:
    from audit.config import load_config
    from audit.pipeline import run_audit

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    cfg = load_config(None, [f"run.root={work / 'runs'}", f"prompts.source={prompts}", f"model.path=builtin:{testbed}",
                             f"generation.samples_per_prompt={samples}", f"generation.steps={steps}",
                             f"reference.path=builtin:{testbed}", "generation.prompts_per_shard=8",
                             f"detection.calibration={mode}"])
    return run_audit(cfg).run_path


def upper95(count: int, n: int) -> float:
    from audit.report.stats import wilson

    return wilson(count, n)[1]


def evaluate(run: Path, truth: dict[str, tuple[str, int]], memorized_min: int) -> dict[str, Any]:
    from audit.report.stats import best_labels

    scores = pq.read_table(run / "prompt_scores").to_pylist()
    best = best_labels(pq.read_table(run / "matches"))
    samples = pq.read_table(run / "samples", columns=["sample_id", "prompt_id", "status"]).to_pylist()
    rows = []
    for r in scores:
        group, dups = truth[r["prompt_id"]]
        r["clique_frac"] = r["clique_size"] / r["n_samples"]
        r["evidence"] = -np.log10(max(r["p_value"], 1e-300))
        rows.append((group, dups, r))
    result: dict[str, Any] = {"methods": {}, "groups": {},
                              "thresholds": json.loads((run / "thresholds.json").read_text())}
    for name, (column, sign) in SIGNALS.items():
        def value(r: dict) -> float:
            v = r[column]
            return -np.inf if v is None or (isinstance(v, float) and np.isnan(v)) else sign * float(v)
        pos = np.array([value(r) for _, d, r in rows if d >= memorized_min])
        neg = np.array([value(r) for _, d, r in rows if d <= 1])
        result["methods"][name] = {"auc": roc_auc(pos, neg), "tpr@1%fpr": tpr_at_fpr(pos, neg)}
    for group in sorted({g for g, _, _ in rows}):
        members = [r for g, _, r in rows if g == group]
        ids = {r["prompt_id"] for r in members}
        ok = [s["sample_id"] for s in samples if s["prompt_id"] in ids and s["status"] == "ok"]
        counts = {label: sum(best.get(s) == label for s in ok) for label in LABELS}
        result["groups"][group] = {
            "prompts": len(members), "samples": len(ok),
            "flagged": float(np.mean([r["flagged"] for r in members])),
            "flagged_count": int(sum(r["flagged"] for r in members)),
            "labels": {label: {"rate": counts[label] / max(len(ok), 1), "upper95": upper95(counts[label], len(ok))}
                       for label in LABELS},
        }
    return result


def testbed_truth(testbed: str) -> list[dict[str, Any]]:
    from audit.testbed.checkpoints import shipped_folder

    return pq.read_table(shipped_folder(testbed) / "ground_truth.parquet").to_pylist()


def print_testbed(testbed: str, results: dict[int, dict[str, Any]], samples: list[int]) -> None:
    groups = list(next(iter(results.values()))["calibrated"]["groups"])
    groups.sort(key=lambda g: (g == "heldout", g == "single", -int(g[3:]) if g.startswith("dup") else 0))
    print(f"\n## {testbed}\n")
    header = "".join(f" | AUC n={s} {m} | TPR@1%FPR n={s} {m}" for s in samples for m in MODES)
    print(f"| method{header} |")
    print("|---" + "|---:" * 2 * len(samples) * len(MODES) + "|")
    for name in SIGNALS:
        cells = "".join(f" | {results[s][m]['methods'][name]['auc']:.3f} | {results[s][m]['methods'][name]['tpr@1%fpr']:.3f}"
                        for s in samples for m in MODES)
        print(f"| {name}{cells} |")
    print("\nflagged share per group (flag test at detection.flag_fpr):\n")
    print("| group" + "".join(f" | n={s} {m}" for s in samples for m in MODES) + " |")
    print("|---" + "|---:" * len(samples) * len(MODES) + "|")
    for g in groups:
        print(f"| {g}" + "".join(f" | {results[s][m]['groups'][g]['flagged_count']}/{results[s][m]['groups'][g]['prompts']}"
                                 for s in samples for m in MODES) + " |")
    for s in samples:
        print(f"\nsample-level label rates at n={s}, paper → calibrated (upper 95% bound of the calibrated rate):\n")
        print("| group | " + " | ".join(label.replace("_", " ") for label in LABELS) + " |")
        print("|---" + "|---" * len(LABELS) + "|")
        for g in groups:
            cells = []
            for label in LABELS:
                p, c = (results[s][m]["groups"][g]["labels"][label] for m in MODES)
                cells.append(f"{100 * p['rate']:.1f}% → {100 * c['rate']:.1f}% (≤{100 * c['upper95']:.1f}%)")
            print(f"| {g} | " + " | ".join(cells) + " |")
    t = results[samples[0]]["calibrated"]["thresholds"]
    p = results[samples[0]]["paper"]["thresholds"]
    print(f"\nthresholds: paper tiled L2 {p['match_l2']:.4f} / split-product {p['template_similarity']:.4f}; calibrated "
          f"{t['match_l2']:.4f} / {t['template_similarity']:.4f} on {t['calibration']['images']} training images. "
          f"False labels alone per sample (upper 95%): verbatim {100 * t['verbatim_rate']['upper']:.2f}% calibrated, "
          f"{100 * p['verbatim_rate']['upper']:.2f}% paper; template {100 * t['template_rate']['upper']:.2f}% calibrated, "
          f"{100 * p['template_rate']['upper']:.2f}% paper")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbeds", nargs="+", default=["testbed", "testbed-maps"])
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memorized-min", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for testbed in args.testbeds:
            table = testbed_truth(testbed)
            truth = {r["prompt_id"]: (r["group"], r["duplicates"]) for r in table}
            captions: list[str] = []
            for group in sorted({r["group"] for r in table}):
                captions += [r["caption"] for r in table if r["group"] == group][: args.per_group]
            results[testbed] = {}
            for samples in args.samples:
                results[testbed][samples] = {}
                for mode in MODES:  # the second mode redoes detection only
                    run = audit(Path(tmp) / testbed / f"s{samples}", testbed, captions, samples, args.steps, mode)
                    results[testbed][samples][mode] = evaluate(run, truth, args.memorized_min)
    print(f"{args.per_group} captions per group, {args.steps} steps; memorized = duplicated >= {args.memorized_min}x, "
          "not memorized = 1x or held out")
    for testbed in args.testbeds:
        print_testbed(testbed, results[testbed], args.samples)
    if args.json:
        args.json.write_text(json.dumps({t: {str(k): v for k, v in r.items()} for t, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
