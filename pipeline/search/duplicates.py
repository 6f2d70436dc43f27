"""Near-duplicate groups by embedding, exactly, in memory-bounded blocks.

Every pair is compared once (upper triangle of X @ X.T, BLOCK x BLOCK tiles,
64 MiB of float32 each), so the cost is N^2/2 dot products of length D: about
a minute for 100k x 768 on two cores, and too slow at a million (use a
``--where``-style pre-filter through ``captioner sql`` there, or sample).
Pairs at or above the threshold are joined with union-find.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

BLOCK = 4096


def embeddings_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """(N, dim) float32 from a fixed_size_list<float>[dim] column."""
    parts = [chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for chunk in column.chunks]
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def near_duplicate_groups(x: np.ndarray, threshold: float, block: int = BLOCK) -> list[list[tuple[int, float]]]:
    """Groups (of 2+) of row numbers with their best similarity inside the group.

    Rows are assumed L2-normalised (the schema promises it); they are
    re-normalised anyway so a stray unnormalised row cannot fake a match.
    Groups come largest first, then by first row.
    """
    n = len(x)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    parent = np.arange(n)
    best = np.full(n, -np.inf, dtype=np.float32)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i0 in range(0, n, block):
        xi = x[i0 : i0 + block]
        for j0 in range(i0, n, block):
            sims = xi @ x[j0 : j0 + block].T
            if j0 == i0:
                sims = np.triu(sims, k=1) + np.tril(np.full_like(sims, -np.inf))  # each pair once, no self
            rows, cols = np.nonzero(sims >= threshold)
            for r, c in zip(rows.tolist(), cols.tolist()):
                a, b, s = i0 + r, j0 + c, float(sims[r, c])
                best[a] = max(best[a], s)
                best[b] = max(best[b], s)
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[tuple[int, float]]] = {}
    for a in np.nonzero(best > -np.inf)[0].tolist():
        groups.setdefault(find(a), []).append((a, float(best[a])))
    return sorted(groups.values(), key=lambda g: (-len(g), g[0][0]))
