"""Connected components without the whole graph in one process: large-star / small-star rounds.

The graph (candidate duplicate pairs, both directions) lives in files partitioned by a hash of
the first node. A round is one task per partition: it reads its partition from every task of the
previous round, applies large-star or small-star (Kiveris, Lattanzi, Mirrokni, Rastogi,
Vassilvitskii, "Connected Components in MapReduce and Beyond", SoCC 2014; rounds alternate, and
converge in O(log^2 n) rounds) and writes its output edges partitioned again. Both operations
keep the components and shrink every component towards a star around its smallest node.

Convergence is checked exactly and locally: the graph is a union of stars centred on their
minimum iff every node either has only larger neighbours (a centre) or exactly one neighbour,
which is smaller (a leaf). Each task counts the nodes of its input that are neither; when a
whole round counts none, its input is final, and the leaf -> centre pairs it wrote are the
removals (the centre is the component's smallest node: the survivor).

Node order is (hi, lo) (see shuffle.py): source priority, then document id.
"""

from __future__ import annotations

import numpy as np

from .shuffle import less


def unique_edges(ahi, alo, bhi, blo):
    """Sort directed edges by (a, b), drop duplicates and self loops."""
    keep = (ahi != bhi) | (alo != blo)
    ahi, alo, bhi, blo = ahi[keep], alo[keep], bhi[keep], blo[keep]
    if not len(ahi):
        return ahi, alo, bhi, blo
    order = np.lexsort([blo, bhi, alo, ahi])
    ahi, alo, bhi, blo = ahi[order], alo[order], bhi[order], blo[order]
    dup = np.zeros(len(ahi), dtype=bool)
    dup[1:] = (ahi[1:] == ahi[:-1]) & (alo[1:] == alo[:-1]) & (bhi[1:] == bhi[:-1]) & (blo[1:] == blo[:-1])
    return ahi[~dup], alo[~dup], bhi[~dup], blo[~dup]


def both_directions(xhi, xlo, yhi, ylo):
    return (np.concatenate([xhi, yhi]), np.concatenate([xlo, ylo]),
            np.concatenate([yhi, xhi]), np.concatenate([ylo, xlo]))


class Neighbourhoods:
    """Sorted unique directed edges grouped by their first node."""

    def __init__(self, ahi, alo, bhi, blo):
        self.ahi, self.alo, self.bhi, self.blo = unique_edges(ahi, alo, bhi, blo)
        n = len(self.ahi)
        first = np.ones(n, dtype=bool)
        if n:
            first[1:] = (self.ahi[1:] != self.ahi[:-1]) | (self.alo[1:] != self.alo[:-1])
        self.starts = np.flatnonzero(first)
        self.group = np.cumsum(first) - 1  # group of every edge
        self.deg = np.diff(np.append(self.starts, n))
        # each node's smallest neighbour (edges are sorted by b within a group)
        self.nhi, self.nlo = self.ahi[self.starts], self.alo[self.starts]
        self.mhi, self.mlo = self.bhi[self.starts], self.blo[self.starts]

    def __len__(self) -> int:
        return len(self.ahi)

    def check(self):
        """(violations, leaves (hi, lo, centre hi, centre lo), centres (hi, lo, size))."""
        centre = less(self.nhi, self.nlo, self.mhi, self.mlo)
        leaf = (self.deg == 1) & ~centre
        violations = int(len(self.starts) - centre.sum() - leaf.sum())
        leaves = (self.nhi[leaf], self.nlo[leaf], self.mhi[leaf], self.mlo[leaf])
        centres = (self.nhi[centre], self.nlo[centre], (self.deg[centre] + 1).astype(np.uint64))
        return violations, leaves, centres

    def large_star(self):
        """Every node u links each larger neighbour to m(u) = min(u, neighbours). Undirected output."""
        g = self.group
        mhi, mlo = _min_pair(self.nhi, self.nlo, self.mhi, self.mlo)
        sel = less(self.ahi, self.alo, self.bhi, self.blo)
        return both_directions(self.bhi[sel], self.blo[sel], mhi[g[sel]], mlo[g[sel]])

    def small_star(self):
        """Every node u links itself and each smaller neighbour to m = min(u, smaller neighbours)."""
        g = self.group
        mhi, mlo = _min_pair(self.nhi, self.nlo, self.mhi, self.mlo)
        sel = less(self.bhi, self.blo, self.ahi, self.alo)
        xhi, xlo = self.bhi[sel], self.blo[sel]
        yhi, ylo = mhi[g[sel]], mlo[g[sel]]
        has_smaller = less(self.mhi, self.mlo, self.nhi, self.nlo)
        xhi = np.concatenate([xhi, self.nhi[has_smaller]])
        xlo = np.concatenate([xlo, self.nlo[has_smaller]])
        yhi = np.concatenate([yhi, mhi[has_smaller]])
        ylo = np.concatenate([ylo, mlo[has_smaller]])
        keep = (xhi != yhi) | (xlo != ylo)
        return both_directions(xhi[keep], xlo[keep], yhi[keep], ylo[keep])


def _min_pair(ahi, alo, bhi, blo):
    a_smaller = less(ahi, alo, bhi, blo)
    return np.where(a_smaller, ahi, bhi), np.where(a_smaller, alo, blo)


def components_in_memory(ahi, alo, bhi, blo, max_rounds: int = 200):
    """Reference: run the rounds in one process until converged (for tests). Returns leaves."""
    for r in range(max_rounds):
        nb = Neighbourhoods(ahi, alo, bhi, blo)
        violations, leaves, _ = nb.check()
        if violations == 0:
            return leaves, r
        ahi, alo, bhi, blo = nb.large_star() if r % 2 == 0 else nb.small_star()
    raise RuntimeError("connected components did not converge")
