"""Largest clique of a copy graph: memaudit's own search against networkx's, side by side.

Detection finds, for each prompt, the largest group of near-identical samples: the largest
clique of the graph "tiled L2 < clique_delta" (audit/detect/cliques.py, a hand-written
Bron-Kerbosch on Python-int bitsets with a degeneracy bound). This times it against networkx's
exact maximum clique (``max_weight_clique(G, weight=None)``, branch and bound; and, for
reference, the largest of ``find_cliques``, which enumerates every maximal clique) on the same
graphs, and checks that all find a clique of the same size. networkx's times include building its
Graph from the adjacency matrix (that is what replacing the search would cost), also shown apart.

Graphs, ``--samples`` nodes each (500: a large audit's samples per prompt):
  diverse       distinct random images, no copies (most prompts)
  planted k     k noisy copies of one image among otherwise distinct ones (a memorized prompt)
  variants k    k copies varied along a few directions (pose, light): a dense graph, not a clique
  random p      Erdős-Rényi graphs of edge probability p (no geometry: a harder search)
Copy graphs are made as detection makes them: pairwise tiled L2 of 32x32 images, < delta.

    python benchmarks/cliques.py
    python benchmarks/cliques.py --samples 200 --repeats 1 --json cliques.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from audit.detect.cliques import copy_graph, largest_clique
from audit.similarity import pairwise_tiled_l2

SIDE = 32  # image side: tiled L2 over 4x4 tiles, as detection computes it at any size


def smooth_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct photo-like images: random 8x8 colour fields, upsampled (float, 0..255)."""
    coarse = rng.uniform(0, 255, (n, 8, 8, 3))
    return coarse.repeat(SIDE // 8, axis=1).repeat(SIDE // 8, axis=2)


def as_uint8(images: np.ndarray) -> np.ndarray:
    """Images as detection sees them: rounded to 8-bit pixels."""
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def planted(n: int, k: int, rng: np.random.Generator, delta: float) -> np.ndarray:
    """``k`` copies of one image with a little pixel noise (as a memorized prompt regenerates its
    training image whatever the seed) among ``n - k`` distinct images."""
    images = smooth_images(n, rng)
    members = rng.choice(n, k, replace=False)
    images[members] = images[members[0]] + rng.normal(0, 4, (k, SIDE, SIDE, 3))
    return copy_graph(pairwise_tiled_l2(as_uint8(images)), delta)


def variants(n: int, k: int, spread: float, rng: np.random.Generator, delta: float, directions: int = 3) -> np.ndarray:
    """``k`` copies of one image moved along a few smooth directions by ``spread`` (a template
    memorized with variations): pairs closer than ``delta`` form a geometric graph, not one clique
    (at delta 0.15, spread 0.12 links ~90% of the group's pairs, 0.2 ~45%)."""
    images = smooth_images(n, rng)
    members = rng.choice(n, k, replace=False)
    basis = smooth_images(directions, rng) - 127.5
    amounts = rng.normal(0, spread, (k, directions))
    images[members] = images[members[0]] + np.einsum("kd,dhwc->khwc", amounts, basis)
    return copy_graph(pairwise_tiled_l2(as_uint8(images)), delta)


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """A G(n, p) adjacency matrix: no geometry, so no bound prunes as well as on copy graphs."""
    upper = np.triu(rng.random((n, n)) < p, 1)
    return upper | upper.T


def graphs(n: int, planted_sizes: list[int], variant_sizes: list[int], spreads: list[float], densities: list[float],
           delta: float, seed: int) -> dict[str, np.ndarray]:
    """Every benchmark graph by name (see the module docstring), from one seeded generator."""
    rng = np.random.default_rng(seed)
    out = {"diverse": copy_graph(pairwise_tiled_l2(as_uint8(smooth_images(n, rng))), delta)}
    out.update({f"planted {k}": planted(n, k, rng, delta) for k in planted_sizes})
    out.update({f"variants {k} spread {s:g}": variants(n, k, s, rng, delta) for k in variant_sizes for s in spreads})
    out.update({f"random p={p:g}": erdos_renyi(n, p, rng) for p in densities})
    return out


def timed(fn: Callable[[], int], repeats: int) -> tuple[int, float]:
    """The clique size ``fn`` returns and its median wall time over ``repeats`` calls."""
    seconds, size = [], -1
    for _ in range(repeats):
        start = time.perf_counter()
        size = fn()
        seconds.append(time.perf_counter() - start)
    return size, statistics.median(seconds)


def measure(adjacency: np.ndarray, repeats: int, enumerate_all: bool) -> dict[str, Any]:
    """Both searches on one graph: sizes, median seconds, and whether the sizes agree."""
    result: dict[str, Any] = {"nodes": len(adjacency), "edges": int(adjacency.sum() // 2)}
    exact = []

    def hand() -> int:
        clique = largest_clique(adjacency)
        exact.append(clique.exact)
        return clique.size

    result["hand_size"], result["hand_s"] = timed(hand, repeats)
    result["hand_exact"] = all(exact)
    _, result["nx_graph_s"] = timed(lambda: nx.from_numpy_array(adjacency).number_of_nodes(), repeats)
    result["nx_size"], result["nx_s"] = timed(
        lambda: int(nx.max_weight_clique(nx.from_numpy_array(adjacency), weight=None)[1]), repeats)
    sizes = [result["hand_size"], result["nx_size"]]
    if enumerate_all:
        result["nx_enum_size"], result["nx_enum_s"] = timed(
            lambda: max(map(len, nx.find_cliques(nx.from_numpy_array(adjacency)))), repeats)
        sizes.append(result["nx_enum_size"])
        result["nx_enum_vs_hand"] = result["nx_enum_s"] / result["hand_s"]
    result["agree"] = len(set(sizes)) == 1
    result["nx_vs_hand"] = result["nx_s"] / result["hand_s"]
    return result


def print_table(results: dict[str, dict[str, Any]], enumerate_all: bool) -> None:
    """The results as a Markdown table (times in seconds; networkx's include building its Graph)."""
    enum_head = " | find_cliques size | s | find_cliques / hand time" if enumerate_all else ""
    print(f"| graph | nodes | edges | hand-written size | s | nx max_weight_clique size | s (graph build) | "
          f"max_weight_clique / hand time{enum_head} | same size |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if enumerate_all else "") + "---|")
    for name, r in results.items():
        hand = f"{r['hand_size']}{'' if r['hand_exact'] else ' (budget hit)'}"
        enum = f" | {r['nx_enum_size']} | {r['nx_enum_s']:.4f} | {r['nx_enum_vs_hand']:.2f}x" if enumerate_all else ""
        print(f"| {name} | {r['nodes']} | {r['edges']} | {hand} | {r['hand_s']:.4f} | {r['nx_size']} | "
              f"{r['nx_s']:.4f} ({r['nx_graph_s']:.4f}) | {r['nx_vs_hand']:.2f}x{enum} | "
              f"{'yes' if r['agree'] else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500, help="nodes per graph (samples per prompt)")
    parser.add_argument("--planted", type=int, nargs="+", default=[10, 30, 60])
    parser.add_argument("--variants", type=int, nargs="+", default=[60, 150])
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.12, 0.2], help="variants' spread")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--delta", type=float, default=0.15, help="clique_delta (tiled L2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-enumerate", action="store_true", help="skip networkx's find_cliques")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    built = graphs(args.samples, args.planted, args.variants, args.spreads, args.densities, args.delta, args.seed)
    results = {}
    for name, adjacency in built.items():
        results[name] = measure(adjacency, args.repeats, not args.no_enumerate)
        r = results[name]
        print(f"{name}: {r['edges']} edges, clique {r['hand_size']} / {r['nx_size']}, "
              f"{r['hand_s']:.4f} s / {r['nx_s']:.4f} s", flush=True)
    print(f"\nlargest clique, {args.samples} samples per graph, median of {args.repeats}; networkx {nx.__version__}")
    print_table(results, not args.no_enumerate)
    disagree = [name for name, r in results.items() if not r["agree"]]
    print(f"sizes agree on {len(results) - len(disagree)}/{len(results)} graphs" +
          (f"; differ on: {', '.join(disagree)}" if disagree else ""))
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "networkx": nx.__version__, "graphs": results},
                                        indent=2))
    if disagree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
