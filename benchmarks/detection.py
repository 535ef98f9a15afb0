"""Detection quality on the testbed: prompt-level ROC AUC and TPR@1%FPR of every signal.

Runs the whole chain (`memaudit run`: generation on local Ray, embeddings, kNN join against the
testbed's training set, cliques, verification, scores) on ``--per-group`` captions of each
testbed group, for each ``--samples`` setting, then scores each signal against the ground truth:
memorized = captions duplicated >= ``--memorized-min`` times in training, not memorized = seen
once or held out (2x captions are reported per group, not in the AUC). Table in the format of
Jeon et al. (ICML 2025) Table 1: one row per method, AUC and TPR@1%FPR.

    python benchmarks/detection.py                          # 16 captions/group, 4 and 8 samples
    python benchmarks/detection.py --per-group 8 --samples 4 --steps 10   # quicker
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

SIGNALS = {
    "noise magnitude (Wen et al.)": ("noise_magnitude", 1),
    "largest clique / n (Carlini et al.)": ("clique_frac", 1),
    "best neighbour cosine (copy embedding)": ("best_cosine", 1),
    "best split-product (Somepalli et al.)": ("best_split_product", 1),
    "closest verified pixel copy (-tiled L2)": ("min_tiled_l2", -1),
    "memaudit score (combined)": ("score", 1),
}


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


def audit(work: Path, reference: Path, captions: list[str], samples: int, steps: int) -> Path:
    from audit.config import load_config
    from audit.pipeline import run_audit

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    cfg = load_config(None, [f"run.root={work / 'runs'}", f"prompts.source={prompts}",
                             f"generation.samples_per_prompt={samples}", f"generation.steps={steps}",
                             f"reference.path={reference}", "generation.prompts_per_shard=8"])
    return run_audit(cfg).run_path


def evaluate(run: Path, truth: dict[str, tuple[str, int]], memorized_min: int) -> dict[str, object]:
    scores = pq.read_table(run / "prompt_scores").to_pylist()
    rows = []
    for r in scores:
        group, dups = truth[r["prompt_id"]]
        r["clique_frac"] = r["clique_size"] / r["n_samples"]
        rows.append((group, dups, r))
    result: dict[str, object] = {"methods": {}, "groups": {}}
    for name, (column, sign) in SIGNALS.items():
        def value(r: dict) -> float:
            v = r[column]
            return -np.inf if v is None or (isinstance(v, float) and np.isnan(v)) else sign * float(v)
        pos = np.array([value(r) for _, d, r in rows if d >= memorized_min])
        neg = np.array([value(r) for _, d, r in rows if d <= 1])
        result["methods"][name] = {"auc": roc_auc(pos, neg), "tpr@1%fpr": tpr_at_fpr(pos, neg)}
    for group in sorted({g for g, _, _ in rows}):
        members = [r for g, _, r in rows if g == group]
        result["groups"][group] = {"prompts": len(members), "flagged": float(np.mean([r["flagged"] for r in members])),
                                   "score": float(np.mean([r["score"] for r in members])),
                                   "matching": float(np.mean([r["n_matching"] / r["n_samples"] for r in members]))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memorized-min", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from audit.cli import main as cli
    from audit.testbed.checkpoints import testbed_folder

    truth_table = pq.read_table(testbed_folder() / "ground_truth.parquet").to_pylist()
    truth = {r["prompt_id"]: (r["group"], r["duplicates"]) for r in truth_table}
    captions: list[str] = []
    for group in ("dup32", "dup8", "dup2", "single", "heldout"):
        captions += [r["caption"] for r in truth_table if r["group"] == group][: args.per_group]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assert cli(["-q", "reference", "testbed", str(work / "reference")]) == 0
        for samples in args.samples:
            run = audit(work / f"s{samples}", work / "reference", captions, samples, args.steps)
            results[samples] = evaluate(run, truth, args.memorized_min)
    print(f"testbed, {args.per_group} captions per group, {args.steps} steps; memorized = duplicated >= "
          f"{args.memorized_min}x, not memorized = 1x or held out")
    header = "".join(f" | AUC n={s} | TPR@1%FPR n={s}" for s in args.samples)
    print(f"| method{header} |")
    print("|---" + "|---:" * 2 * len(args.samples) + "|")
    for name in SIGNALS:
        cells = "".join(f" | {results[s]['methods'][name]['auc']:.3f} | {results[s]['methods'][name]['tpr@1%fpr']:.3f}"
                        for s in args.samples)
        print(f"| {name}{cells} |")
    print("\nby duplication count (flagged share / mean score / share of samples matching their own image):")
    for group in ("dup32", "dup8", "dup2", "single", "heldout"):
        cells = "; ".join(f"n={s}: {results[s]['groups'][group]['flagged']:.2f} / {results[s]['groups'][group]['score']:.2f}"
                          f" / {results[s]['groups'][group]['matching']:.2f}" for s in args.samples)
        print(f"  {group:8} {cells}")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
