"""Duplicate groups: the same bytes (exact tier) and near-identical embeddings (near tier), at any size.

Exact: rows with the same ``image_id`` (the bytes' sha256), found by DuckDB.
Near: pairs with cosine >= the threshold among each row's nearest
neighbours, found through the IVF lists (pipeline.search.ann / scan) rather
than by comparing every pair: the rows of each list are compared with those
of the same list and of its ``NEIGHBOUR_LISTS`` nearest lists (by centroid),
one BLAS product per list. A pair at cosine 0.95 lies in one list or in two
neighbouring ones, so it is almost always found, though not guaranteed to be
(an approximate search, like the IVF queries); bench/search.py plants such
pairs and counts them: at 1M x 768 all 1,000 in 144 s on the loaded 2-core
machine. An index without lists gets temporary ones (k-means on a
sample, as ``captioner index`` trains them) above ``EXACT_ROWS`` rows; below,
every pair is compared, in blocks.

Pairs of both tiers are joined into connected groups (A~B and B~C: one
group); a group is ``exact`` when all its members have the same bytes, else
``near``.
"""

from __future__ import annotations

import numpy as np

BLOCK = 4096
# Up to this many vectors (without IVF lists) every pair is compared: N^2/2 dot products, 0.15 TFLOP at 768-D,
# a few seconds on 2 cores; above, temporary lists cost less.
EXACT_ROWS = 20_000
# Besides its own list, each list is compared with this many nearest lists (and every list that counts it
# among its nearest). 200k x 768 (bench/search.py vectors, 447 lists, 1,000 planted pairs at cosine ~0.99):
# 1 found 995, 2 found all 1,000 in 4.8 s; 3 leaves a margin.
NEIGHBOUR_LISTS = 3


def near_pairs(matrix, inv_norms: np.ndarray, slots: np.ndarray, threshold: float, *,
               lists: np.ndarray | None = None, centroids: np.ndarray | None = None,
               neighbours: int = NEIGHBOUR_LISTS):
    """(slot a, slot b, cosine) arrays of the pairs among ``slots`` at or above ``threshold``, each once (a < b).

    ``matrix``: float32 rows by slot, indexed with arrays of slots (a
    pipeline.search.vectors.VectorPlanes, or an ndarray).

    ``lists``/``centroids``: the IVF lists (lists per slot); without them,
    above EXACT_ROWS vectors, temporary ones are trained.
    """
    slots = np.sort(np.asarray(slots, np.int64))
    if len(slots) < 2:
        return _empty()
    if centroids is None or lists is None:
        if len(slots) <= EXACT_ROWS:
            return _pairs_in_blocks(matrix, inv_norms, slots, slots, threshold, same=True)
        from pipeline.search import ann

        centroids = ann.train(_rows(matrix, slots), ann.list_count(len(slots)))
        lists = np.full(len(matrix), -1, np.int32)
        lists[slots] = ann.assign(centroids, _RowView(matrix, slots))
    member_lists = lists[slots]
    order = np.argsort(member_lists, kind="stable")
    members = slots[order]
    offsets = np.searchsorted(member_lists[order], np.arange(len(centroids) + 1))
    out = []
    for a, partners in enumerate(_partner_lists(centroids, neighbours)):
        left = members[offsets[a]:offsets[a + 1]]
        if not len(left):
            continue
        # One product per list: its rows against its own rows and its partners' rows together.
        right = np.concatenate([left, *(members[offsets[b]:offsets[b + 1]] for b in partners)])
        out.append(_pairs_in_blocks(matrix, inv_norms, left, right, threshold, same=True))
    if not out:
        return _empty()
    first, second, sims = (np.concatenate(parts) for parts in zip(*out))
    swap = first > second
    first[swap], second[swap] = second[swap], first[swap]
    return first, second, sims


def _partner_lists(centroids: np.ndarray, neighbours: int) -> list[list[int]]:
    """Per list a: the lists b > a it is compared with (b among a's nearest, or a among b's), each pair once."""
    count = len(centroids)
    partners: list[set[int]] = [set() for _ in range(count)]
    take = min(neighbours, count - 1)
    if take > 0:
        for start in range(0, count, 1024):
            stop = min(count, start + 1024)
            sims = centroids[start:stop] @ centroids.T
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
            near = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            for a, row in zip(range(start, stop), near.tolist()):
                for b in row:
                    partners[min(a, b)].add(max(a, b))
    return [sorted(p) for p in partners]


def _pairs_in_blocks(matrix, inv_norms, left, right, threshold, *, same: bool):
    """Pairs (left slot, right slot, cosine) >= threshold; ``same``: ``right`` starts with ``left`` (those
    pairs are taken once each, without self-pairs)."""
    firsts, seconds, sims = [], [], []
    for i0 in range(0, len(left), BLOCK):
        a = left[i0:i0 + BLOCK]
        xa = matrix[a] * inv_norms[a][:, None]
        for j0 in range(i0 if same else 0, len(right), BLOCK):
            b = right[j0:j0 + BLOCK]
            xb = matrix[b] * inv_norms[b][:, None]
            s = xa @ xb.T
            if same and j0 < len(left):
                # columns j0.. that are rows of ``left`` itself: keep only those after the row's own position
                cols = np.arange(j0, j0 + len(b))
                s[(cols[None, :] <= np.arange(i0, i0 + len(a))[:, None]) & (cols[None, :] < len(left))] = -np.inf
            r, c = np.nonzero(s >= threshold)
            firsts.append(a[r])
            seconds.append(b[c])
            sims.append(s[r, c])
    if not firsts:
        return _empty()
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(sims).astype(np.float32)


def _empty():
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def _rows(matrix, slots):
    """A training sample's rows (ann.train samples at most TRAIN_ROWS of what it is given)."""
    from pipeline.search import ann

    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(slots, size=min(len(slots), ann.TRAIN_ROWS), replace=False))
    return matrix[picked]


class _RowView:
    """``matrix[slots]`` read chunk by chunk (ann.assign slices it), never copied whole."""

    def __init__(self, matrix, slots):
        self.matrix, self.slots = matrix, slots

    def __len__(self):
        return len(self.slots)

    def __getitem__(self, part):
        return self.matrix[self.slots[part]]


def groups_of(pairs_a: np.ndarray, pairs_b: np.ndarray, weights: np.ndarray):
    """Connected groups over the pairs: {root: [(node, best weight of its pairs)]}, nodes as given."""
    nodes, inverse = np.unique(np.concatenate([pairs_a, pairs_b]), return_inverse=True)
    if not len(nodes):
        return []
    a, b = inverse[:len(pairs_a)], inverse[len(pairs_a):]
    label = _components(len(nodes), a, b)
    best = np.full(len(nodes), -np.inf, np.float64)
    np.maximum.at(best, a, weights)
    np.maximum.at(best, b, weights)
    grouped: dict[int, list] = {}
    for node, lab, w in zip(nodes.tolist(), label.tolist(), best.tolist()):
        grouped.setdefault(lab, []).append((node, w))
    return list(grouped.values())


def _components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest node of each node's connected component, over the edges (a[i], b[i]): union-find in
    numpy (every edge hooks the larger root under the smaller, then paths are halved until flat)."""
    parent = np.arange(count)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
