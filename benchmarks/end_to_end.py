"""End to end on the testbed: what Ray + Parquet add to the pure model time.

The same samples are produced twice:
- pure model time: in this process, a plain ``pipe(...)`` loop (benchmarks/generation.py's) and
  the embedding stage on the resulting images held in memory — no Ray, no files;
- `memaudit run` on a local Ray (started once, before timing): generation actors, PNG + Parquet
  shards, markers, then the embedding actors reading those shards back, then the kNN join and
  detection. The busy windows of generation and embedding are read from the shards' markers
  (first start to last finish, as the workers recorded them); worker start-up (model loading)
  and the join/detection are printed apart.

overhead = (generation window + embedding window) / (pure generation + pure embedding) - 1.
Rounds alternate the two and medians are reported. Target on CPU: overhead <= 10%.

    python benchmarks/end_to_end.py                 # testbed, 40 prompts x 8 samples, 20 steps
    python benchmarks/end_to_end.py --samples 4 --repeats 1 --json e2e.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from audit.config import AuditConfig, load_config
from local_cluster import busy_window


def _config(args: argparse.Namespace, work: Path) -> AuditConfig:
    return load_config(None, [f"run.root={work / 'runs'}", f"generation.samples_per_prompt={args.samples}",
                              f"generation.steps={args.steps}", f"compute.batch_size={args.batch_size}",
                              f"generation.prompts_per_shard={args.prompts_per_shard}",
                              f"prompts.limit={args.prompts}"])


def pure(cfg: AuditConfig) -> dict[str, float]:
    """Seconds of the plain generation loop and of embedding its images, in this process."""
    from generation import plain_loop

    from audit.embed.stage import EmbedStage

    images: list[np.ndarray] = []
    n, gen_s = plain_loop(cfg, keep=images)
    pngs = []
    for image in images:  # encoded once here, untimed: the Ray path embeds PNG bytes too
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    stage = EmbedStage(cfg.embedding, "cpu")
    start = time.perf_counter()
    batch = cfg.embedding.batch_size
    for i in range(0, len(pngs), batch):
        stage({"image": np.array(pngs[i : i + batch], dtype=object)})
    return {"samples": n, "generation_s": gen_s, "embedding_s": time.perf_counter() - start}


def ray_run(cfg: AuditConfig) -> dict[str, float]:
    from audit.pipeline import run_audit

    start = time.perf_counter()
    result = run_audit(cfg)
    wall = time.perf_counter() - start
    run = result.run_path
    windows = {f"{stage}_window_s": busy_window(run, table)[1] if (run / table / "_markers").is_dir() else 0.0
               for stage, table in (("generation", "samples"), ("embedding", "embeddings"),
                                    ("neighbors", "neighbors"), ("detection", "prompt_scores"))}
    return {"samples": result.generation.samples_written, "wall_s": wall, **windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompts-per-shard", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from audit.pipeline import connect

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="memaudit-e2e-") as tmp:
        connect(None)
        for round_ in range(args.repeats):
            work = Path(tmp) / f"round-{round_}"
            work.mkdir()
            cfg = _config(args, work)
            model = pure(cfg)
            piped = ray_run(cfg)
            model_s = model["generation_s"] + model["embedding_s"]
            busy_s = piped["generation_window_s"] + piped["embedding_window_s"]
            rounds.append({"pure": model, "ray": piped, "overhead": busy_s / model_s - 1})
            print(f"round {round_}: pure {model_s:.1f} s (generation {model['generation_s']:.1f}, embedding "
                  f"{model['embedding_s']:.1f}); ray busy {busy_s:.1f} s (generation "
                  f"{piped['generation_window_s']:.1f}, embedding {piped['embedding_window_s']:.1f}); "
                  f"command {piped['wall_s']:.1f} s; overhead {100 * rounds[-1]['overhead']:+.1f}%", flush=True)
    overhead = statistics.median(r["overhead"] for r in rounds)
    samples = rounds[0]["ray"]["samples"]
    wall = statistics.median(r["ray"]["wall_s"] for r in rounds)
    print(f"testbed, {args.prompts} prompts x {args.samples} samples = {samples}, {args.steps} steps, "
          f"batch {args.batch_size}, {args.repeats} rounds, CPU")
    print("| | seconds (median) | samples/s |")
    print("|---|---|---|")
    for label, key, part in (("pure generation", "generation_s", "pure"), ("pure embedding", "embedding_s", "pure"),
                             ("ray generation window", "generation_window_s", "ray"),
                             ("ray embedding window", "embedding_window_s", "ray"),
                             ("ray kNN join window", "neighbors_window_s", "ray"),
                             ("ray detection window", "detection_window_s", "ray"),
                             ("`memaudit run`, whole command", "wall_s", "ray")):
        seconds = statistics.median(r[part][key] for r in rounds)
        print(f"| {label} | {seconds:.2f} | {samples / seconds if seconds else 0:.1f} |")
    print(f"Ray + Parquet overhead over pure model time: {100 * overhead:+.1f}% (target <= +10%)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "overhead": overhead, "samples": samples, "wall_s": wall}, indent=2))


if __name__ == "__main__":
    main()
