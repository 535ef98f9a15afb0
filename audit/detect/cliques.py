"""Within-prompt copy detection (Carlini et al. 2023): cliques of near-identical generations.

Two samples of one prompt are "the same" when their tiled L2 distance is below delta; a prompt
whose samples contain a large clique in that graph regenerates one image over and over, whatever
the seed: the signature of a memorized prompt. The largest clique is found exactly
(Bron-Kerbosch with pivoting on bitsets) within an expansion budget; past the budget the best
clique found so far is returned with ``exact=False`` and an upper bound (the graph's degeneracy
+ 1), so the error is bounded and reported rather than hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clique:
    members: tuple[int, ...]  # sample positions, ascending
    exact: bool
    upper_bound: int

    @property
    def size(self) -> int:
        return len(self.members)


def copy_graph(distances: np.ndarray, delta: float) -> np.ndarray:
    """Adjacency (bool, no self loops) of pairs closer than ``delta``."""
    adjacency = distances < delta
    np.fill_diagonal(adjacency, False)
    return adjacency


def degeneracy(adjacency: np.ndarray) -> int:
    """The largest k such that the graph has a k-core; a clique has at most degeneracy + 1 nodes."""
    degrees = adjacency.sum(axis=1).astype(np.int64)
    alive = np.ones(len(degrees), dtype=bool)
    best = 0
    for _ in range(len(degrees)):
        candidates = np.where(alive, degrees, np.iinfo(np.int64).max)
        v = int(np.argmin(candidates))
        best = max(best, int(degrees[v]))
        alive[v] = False
        degrees[adjacency[v] & alive] -= 1
    return best


def largest_clique(adjacency: np.ndarray, budget: int = 200_000) -> Clique:
    """The largest clique of the graph (exact unless the expansion ``budget`` runs out)."""
    n = len(adjacency)
    if n == 0:
        return Clique((), True, 0)
    neighbors = [sum(1 << int(j) for j in np.flatnonzero(adjacency[i])) for i in range(n)]
    upper = degeneracy(adjacency) + 1
    best = _greedy(neighbors, n)
    expansions = 0
    stack = [(0, (1 << n) - 1, 0)]  # (clique R, candidates P, excluded X) as bitsets
    exhausted = False
    while stack:
        r, p, x = stack.pop()
        if not p and not x:
            if _popcount(r) > _popcount(best):
                best = r
            continue
        if _popcount(r) + _popcount(p) <= _popcount(best):
            continue  # cannot beat the best clique found
        expansions += 1
        if expansions > budget:
            exhausted = True
            break
        pivot = max(_members(p | x), key=lambda u: _popcount(p & neighbors[u]))
        for v in _members(p & ~neighbors[pivot]):
            bit = 1 << v
            stack.append((r | bit, p & neighbors[v], x & neighbors[v]))
            p &= ~bit
            x |= bit
        if _popcount(best) >= upper:
            break  # reached the bound: provably maximum
    members = tuple(_members(best))
    exact = not exhausted or len(members) >= upper
    return Clique(members, exact, len(members) if exact else upper)


def _greedy(neighbors: list[int], n: int) -> int:
    """A quick lower bound: grow a clique from each node by highest remaining degree."""
    best = 0
    for start in range(n):
        clique, candidates = 1 << start, neighbors[start]
        while candidates:
            v = max(_members(candidates), key=lambda u: _popcount(candidates & neighbors[u]))
            clique |= 1 << v
            candidates &= neighbors[v]
        if _popcount(clique) > _popcount(best):
            best = clique
    return best


def _popcount(bits: int) -> int:
    return bits.bit_count()


def _members(bits: int) -> list[int]:
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out
