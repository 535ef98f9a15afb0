"""The report's figures, drawn with matplotlib (Agg) and saved as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from audit.files import atomic_file  # noqa: E402

DPI = 110


def similarity_histogram(generated: np.ndarray, baseline: np.ndarray, out: Path, n_generated: int | None = None) -> Path:
    """Densities of generated → train and train → train similarity; ``n_generated`` is how many
    samples ``generated`` was drawn from when it holds a sample of them."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    shown = generated.size if n_generated in (None, generated.size) else f"{n_generated}, {generated.size} drawn"
    bins = np.linspace(min([0.0, *(float(a.min()) for a in (generated, baseline) if a.size)]), 1.0, 41)
    if baseline.size:
        ax.hist(baseline, bins=bins, density=True, alpha=0.55, label=f"train → train (n={baseline.size})", color="#7f7f7f")
    if generated.size:
        ax.hist(generated, bins=bins, density=True, alpha=0.55, label=f"generated → train (n={shown})",
                color="#d62728")
    ax.set_xlabel("similarity to the nearest training item (cosine)")
    ax.set_ylabel("density")
    ax.set_title("Nearest training item: generations vs the training set itself")
    if generated.size or baseline.size:
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no reference set: no neighbors", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out)


def calibration_histograms(null: Any, generated: dict[str, np.ndarray], thresholds: dict[str, Any],
                           out: Path) -> Path:
    """The calibration's null (each sampled training image against its nearest distinct training
    images) beside the generated samples against their neighbours, with the thresholds in use:
    closest tiled L2 (copies fall left of the line) and best split-product (templates right)."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4))
    panels = (("tiled_l2", "closest tiled L2 (pixel copy left of the line)", "match_l2", np.nanmin),
              ("split_product", "best split-product (template right of the line)", "template_similarity", np.nanmax))
    for ax, (name, title, key, reduce) in zip(axes, panels):
        train = reduce(getattr(null, name), axis=1) if null is not None else np.zeros(0)
        train = train[np.isfinite(train)]
        mine = generated[name][np.isfinite(generated[name])]
        values = np.concatenate([train, mine, [thresholds[key]]])
        bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 41)
        if train.size:
            ax.hist(train, bins=bins, density=True, alpha=0.55, color="#7f7f7f", label=f"train → train (n={train.size})")
        if mine.size:
            ax.hist(mine, bins=bins, density=True, alpha=0.55, color="#d62728", label=f"generated → train (n={mine.size})")
        ax.axvline(thresholds[key], color="black", linestyle="--", label=f"{thresholds['source']} threshold "
                                                                          f"{thresholds[key]:.4g}")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    if null is None:
        axes[0].text(0.5, 0.6, "no calibration", ha="center", transform=axes[0].transAxes)
    fig.suptitle("Calibration: the training set against itself, and the generations", fontsize=10)
    return _save(fig, out)


SIGNALS = (
    ("noise_magnitude", "noise magnitude (Wen et al.)"),
    ("clique_fraction", "largest clique / samples (Carlini et al.)"),
    ("best_cosine", "best neighbour cosine"),
    ("min_tiled_l2", "min tiled L2 of verified pairs"),
    ("score", "memorization score"),
)


def detector_distributions(scores: pa.Table, out: Path, heading: str = "Detector signals per prompt") -> Path:
    """One panel per signal: its distribution over prompts, flagged and not flagged apart."""
    flagged = scores.column("flagged").to_numpy(zero_copy_only=False).astype(bool)
    values = {name: scores.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
              for name, _ in SIGNALS if name != "clique_fraction"}
    n = np.maximum(scores.column("n_samples").to_numpy().astype(np.float64), 1)
    values["clique_fraction"] = scores.column("clique_size").to_numpy().astype(np.float64) / n
    fig, axes = plt.subplots(1, len(SIGNALS), figsize=(3.0 * len(SIGNALS), 3.0))
    for ax, (name, title) in zip(axes, SIGNALS):
        data = values[name]
        finite = np.isfinite(data)
        if finite.any():
            bins = np.linspace(data[finite].min(), data[finite].max() + 1e-9, 16)
            for mask, label, colour in ((~flagged, "not flagged", "#1f77b4"), (flagged, "flagged", "#d62728")):
                chosen = data[mask & finite]
                if chosen.size:
                    ax.hist(chosen, bins=bins, alpha=0.6, label=f"{label} ({chosen.size})", color=colour)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("prompts" if name == SIGNALS[0][0] else "")
    axes[0].legend(fontsize=8)
    fig.suptitle(heading, fontsize=10)
    return _save(fig, out)


def screen_histogram(score: np.ndarray, escalated: np.ndarray, flagged: np.ndarray, threshold: float | None,
                     top_cutoff: float | None, out: Path) -> Path:
    """The screen score over every screened prompt, stacked: not escalated, escalated and not
    flagged, escalated and flagged; the score threshold (and the lowest score ``screen.top``
    escalated) as lines. Unmeasured prompts (no score) are counted in the title."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    finite = np.isfinite(score)
    lines = [(v, style, label) for v, style, label in ((threshold, "--", "threshold"), (top_cutoff, ":", "top cutoff"))
             if v is not None]
    groups = ((~escalated, "not escalated", "#7f7f7f"), (escalated & ~flagged, "escalated, not flagged", "#1f77b4"),
              (escalated & flagged, "escalated and flagged", "#d62728"))
    if finite.any():
        values = np.concatenate([score[finite], [v for v, _, _ in lines]])
        bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 31)
        chosen = [(score[mask & finite], label, colour) for mask, label, colour in groups]
        chosen = [(data, f"{label} ({data.size})", colour) for data, label, colour in chosen if data.size]
        ax.hist([d for d, _, _ in chosen], bins=bins, stacked=True, color=[c for _, _, c in chosen],
                label=[lab for _, lab, _ in chosen], alpha=0.8)
        for value, style, label in lines:
            ax.axvline(value, color="black", linestyle=style, label=f"{label} {value:.3g}")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no prompt measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("screen score (mean robust z of log noise magnitude and alignment)")
    ax.set_ylabel("prompts")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    unmeasured = int((~finite).sum())
    ax.set_title("Screen scores of all screened prompts" + (f" ({unmeasured} unmeasured, escalated)" if unmeasured
                                                             else ""), fontsize=10)
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_file(out, sync=False) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return out
