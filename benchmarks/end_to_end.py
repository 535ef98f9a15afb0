"""End to end on the testbed: what Ray + Parquet add to the pure model time, and what embedding
while generating saves.

The same samples are produced three ways per round:
- pure model time: in this process, a plain ``pipe(...)`` loop (benchmarks/generation.py's) and
  the embedding stage on the resulting pixels held in memory — no Ray, no files, no PNG;
- `memaudit run` on a local Ray (started once, before timing), default settings: generation
  actors that also embed each batch right after generating it, PNG + Parquet shards, markers,
  then the kNN join and detection;
- the same with ``compute.embed_with_generation=false``: embedding actors start after generation
  and read the shards' PNGs back.
The busy span of generation + embedding is read from the shards' markers (first start to last
finish over samples/ and embeddings/, as the workers recorded them): worker start-up (model
loading) before it is excluded, the wait for embedding workers between the two steps is not.

overhead = busy span (embedding while generating) / (pure generation + pure embedding) - 1.
Rounds alternate the three ways and medians are reported. Target on CPU: overhead <= 10%.

    python benchmarks/end_to_end.py                 # testbed, 40 prompts x 8 samples, 20 steps
    python benchmarks/end_to_end.py --samples 4 --repeats 1 --json e2e.json
"""

from __future__ import annotations

import argparse
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


def _config(args: argparse.Namespace, work: Path, *extra: str) -> AuditConfig:
    return load_config(None, [f"run.root={work / 'runs'}", f"generation.samples_per_prompt={args.samples}",
                              f"generation.steps={args.steps}", f"compute.batch_size={args.batch_size}",
                              f"generation.prompts_per_shard={args.prompts_per_shard}",
                              f"prompts.limit={args.prompts}", *extra])


def pure(cfg: AuditConfig) -> dict[str, float]:
    """Seconds of the plain generation loop and of embedding its pixels, in this process."""
    from generation import plain_loop

    from audit.embed.decode import Decoded
    from audit.embed.embedding import EmbedStage

    images: list[np.ndarray] = []
    n, gen_s = plain_loop(cfg, keep=images)
    stage = EmbedStage(cfg.embedding, "cpu")
    start = time.perf_counter()
    batch = cfg.embedding.batch_size
    for i in range(0, len(images), batch):
        stage.embed_decoded([Decoded(Image.fromarray(image)) for image in images[i : i + batch]])
    return {"samples": n, "generation_s": gen_s, "embedding_s": time.perf_counter() - start}


def _markers(run: Path, table: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (run / table / "_markers").glob("*.json")]


def ray_run(cfg: AuditConfig) -> dict[str, float]:
    from audit.pipeline import run_audit

    start = time.perf_counter()
    result = run_audit(cfg)
    wall = time.perf_counter() - start
    run = result.run_path
    windows = {f"{stage}_window_s": busy_window(run, table)[1] if (run / table / "_markers").is_dir() else 0.0
               for stage, table in (("generation", "samples"), ("embedding", "embeddings"),
                                    ("neighbors", "neighbors"), ("detection", "prompt_scores"))}
    both = _markers(run, "samples") + _markers(run, "embeddings")
    span = max(m["finished_at"] for m in both) - min(m["started_at"] for m in both)
    return {"samples": result.generation.rows_written, "wall_s": wall, "span_s": span,
            "embedded_while_generating": result.embeddings.counts["embedded_while_generating"], **windows}


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
            ways = [("pure", lambda: pure(_config(args, work / "pure"))),
                    ("with", lambda: ray_run(_config(args, work / "with"))),
                    ("after", lambda: ray_run(_config(args, work / "after", "compute.embed_with_generation=false")))]
            if round_ % 2:
                ways = ways[::-1]
            result = {name: way() for name, way in ways}
            model_s = result["pure"]["generation_s"] + result["pure"]["embedding_s"]
            rounds.append({**result, "overhead": result["with"]["span_s"] / model_s - 1,
                           "overhead_after": result["after"]["span_s"] / model_s - 1})
            print(f"round {round_}: pure {model_s:.1f} s (generation {result['pure']['generation_s']:.1f}, "
                  f"embedding {result['pure']['embedding_s']:.1f}); ray span embedding while generating "
                  f"{result['with']['span_s']:.1f} s, embedding after {result['after']['span_s']:.1f} s; command "
                  f"{result['with']['wall_s']:.1f} / {result['after']['wall_s']:.1f} s; overhead "
                  f"{100 * rounds[-1]['overhead']:+.1f}% / {100 * rounds[-1]['overhead_after']:+.1f}%", flush=True)
    overhead = statistics.median(r["overhead"] for r in rounds)
    samples = rounds[0]["with"]["samples"]
    wall = statistics.median(r["with"]["wall_s"] for r in rounds)
    print(f"testbed, {args.prompts} prompts x {args.samples} samples = {samples}, {args.steps} steps, "
          f"batch {args.batch_size}, {args.repeats} rounds, CPU")
    print("| seconds (median) | embedding while generating (default) | embedding after generation |")
    print("|---|---|---|")

    def median(way: str, key: str) -> float:
        return statistics.median(r[way][key] for r in rounds)

    pure_gen, pure_emb = median("pure", "generation_s"), median("pure", "embedding_s")
    print(f"| pure model time: generation {pure_gen:.2f} + embedding {pure_emb:.2f} | {pure_gen + pure_emb:.2f} | |")
    for label, key in (("ray: samples/ window", "generation_window_s"), ("ray: embeddings/ window", "embedding_window_s"),
                       ("ray: busy span, generation start to last embedding", "span_s"),
                       ("ray: kNN join window", "neighbors_window_s"), ("ray: detection window", "detection_window_s"),
                       ("`memaudit run`, whole command", "wall_s")):
        print(f"| {label} | {median('with', key):.2f} | {median('after', key):.2f} |")
    after = statistics.median(r["overhead_after"] for r in rounds)
    print(f"Ray + Parquet overhead over pure model time: {100 * overhead:+.1f}% embedding while generating "
          f"(target <= +10%), {100 * after:+.1f}% embedding after generation")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "overhead": overhead, "overhead_after": after, "samples": samples,
                                         "wall_s": wall}, indent=2))


if __name__ == "__main__":
    main()
