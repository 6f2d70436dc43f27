"""Top-k cosine search over the vector file: exact scans in two passes, and IVF lists above a row count.

Exact, in two passes over the file's two planes (pipeline.search.vectors):

  1. approximate: the query (rounded to bfloat16) times the *high* plane, the
     rows' bfloat16 truncations, by torch (every core, float32 accumulation):
     half the bytes of a float32 matrix, and the scan is memory-bound;
  2. exact: every row whose approximate score could still reach the top k
     (within twice :func:`error_bound` of the k-th best) is joined from both
     planes and scored exactly (its float32 values, summed in float64).

The bound is a worst case, not an estimate, so the answer is the exact top k
of the float32 vectors: the k rows with the best exact scores, ties broken by
id, whatever the rounding of the first pass. Scores are cosine similarities:
the dot product times the stored inverse norm (the files keep the raw
vectors, so ``captioner sql`` returns them unchanged).

Filtered: DuckDB turns the filter into a set of ids (pipeline.search.filters);
only their slots are scanned, so the answer is exact and complete at any
selectivity (k results whenever k rows match). Above ``MASK_SHARE`` of the
rows it is cheaper to scan everything and mask than to gather the rows.

ANN (IVF): k-means centroids (pipeline.search.ann trains them with faiss);
each slot belongs to the list of its nearest centroid; a query scans the
``nprobe`` lists whose centroids are nearest, exactly. A filter restricts the
probed lists' members; when fewer than k members pass, or the filter keeps
fewer than ``EXACT_FILTER_ROWS`` rows, the matching rows are scanned exactly.

No query runs a BLAS product through numpy: OpenBLAS's worker threads spin
for about 0.1 s after each call and would take a core from the next scan
(bench/search.py measured the scan 1.2x slower right after one).

Ties are broken by id, so every path orders equal scores the same way.
"""

from __future__ import annotations

import numpy as np

CHUNK = 65_536  # rows gathered per step (filtered scans, IVF lists, the exact pass)
# Rows per approximate product in a full scan: one torch call over the mapped plane up to 4M rows.
SCAN_CHUNK = 4_194_304
# At most this many rows are scored exactly straight away: the approximate pass would save less than it costs.
DIRECT_ROWS = 2_048
# A filter keeping more than this share of the rows: scan all rows and mask, rather than gather.
MASK_SHARE = 0.3
# A filter keeping at most this many rows is answered by an exact scan of those rows, even with ANN:
# gathering them costs about what probing the lists does (bench/search.py).
EXACT_FILTER_ROWS = 20_000


def error_bound(dim: int) -> float:
    """The most an approximate score can differ from the exact one, per unit of |x| |q| (x a row, q the query).

    Approximate: h . b, h the row's bfloat16 truncation (|x_i - h_i| < 2^-7 |x_i|,
    8 significant bits, |h_i| <= |x_i|), b the query rounded to bfloat16
    (|q_i - b_i| <= 2^-8 |q_i|), products exact in float32, summed in float32
    (at most dim * 2^-24 of the sum of |terms|), the result rounded to
    bfloat16 (2^-8). Exact: x . q summed in float64 (counted as if float32,
    dim * 2^-24: a margin). Both are then multiplied by the row's float32
    inverse norm (2^-24 each). By
    Cauchy-Schwarz every sum of |terms| is at most |x| |q| (1 + 2^-8); a
    margin of 2^-10 covers the norm's own rounding.
    """
    eps = 2.0 ** -24
    grow = 1 + 2.0 ** -8
    products = 2.0 ** -7 + 2.0 ** -8 * grow
    sums = 2 * dim * eps * grow
    result = 2.0 ** -8 * grow * (1 + dim * eps)
    return (products + sums + result + 2 * eps) * (1 + 2.0 ** -10)


def default_nprobe(lists: int) -> int:
    """IVF lists probed per query: 1/128 of them, at least 8 (all of them for tiny indexes).

    bench/search.py (1M x 768, 1,000 lists, its clustered synthetic vectors):
    nprobe 8 and 16 both gave recall@10 1.000; 16 took 2-3x as long (93-107 ms
    against 34-48 ms on the loaded 2-core machine), over the 0.2x-of-exact
    budget. Real embeddings are less clustered: raise --nprobe when recall matters more.
    """
    return max(1, min(lists, max(8, -(-lists // 128))))


class VectorStore:
    """The vectors of one opened index: the planes, slot -> id, inverse norms, and the IVF lists if any."""

    def __init__(self, planes, slot_ids: np.ndarray, inv_norms: np.ndarray, id_count: int,
                 lists: np.ndarray | None = None, centroids: np.ndarray | None = None, nprobe: int | None = None):
        self.planes = planes  # pipeline.search.vectors.VectorPlanes
        self.slot_ids = slot_ids  # int64 per slot; -1: a dead slot
        self.inv_norms = inv_norms  # float32 per slot; 0 for dead slots
        self.dead = np.flatnonzero(slot_ids < 0)
        self.id_to_slot = np.full(max(int(id_count), int(slot_ids.max(initial=-1)) + 1), -1, dtype=np.int64)
        live = slot_ids >= 0
        self._live_mask = live
        self.id_to_slot[slot_ids[live]] = np.flatnonzero(live)
        self.live = int(live.sum())
        self.bound = error_bound(planes.dim)
        self.centroids = centroids
        self.lists = lists  # int32 IVF list per slot (-1: dead), None without ANN
        if centroids is not None and lists is not None:
            order = np.argsort(lists[live], kind="stable")
            self._members = np.flatnonzero(live)[order]  # live slots grouped by list
            self._offsets = np.searchsorted(lists[live][order], np.arange(len(centroids) + 1))
            self.nprobe = int(nprobe) if nprobe else default_nprobe(len(centroids))
        else:
            self._members = self._offsets = None
            self.nprobe = None

    @property
    def ann(self) -> bool:
        return self.centroids is not None

    def vector(self, row_id: int) -> np.ndarray | None:
        slot = self.id_to_slot[row_id] if 0 <= row_id < len(self.id_to_slot) else -1
        return None if slot < 0 else self.planes[[slot]][0]

    def slots_of(self, ids) -> np.ndarray:
        """The live slots of ``ids``, sorted, each once."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self.id_to_slot))]
        slots = self.id_to_slot[ids]
        slots = slots[slots >= 0]
        # A filter's ids usually arrive in slot order already: checking is 40x cheaper than np.unique's sort.
        if len(slots) > 1 and not np.all(slots[1:] > slots[:-1]):
            slots = np.unique(slots)
        return slots

    def top_k(self, q: np.ndarray, k: int, allowed_ids=None, *, exact: bool = False,
              min_score: float | None = None) -> list[tuple[int, float]]:
        """(id, cosine) best first; ``q`` is a unit vector; ``allowed_ids`` None means every row."""
        k = int(k)
        q = np.ascontiguousarray(q, dtype=np.float32)
        allowed = None if allowed_ids is None else self.slots_of(allowed_ids)
        if allowed is not None and len(allowed) == 0:
            return []
        query = _Query(q, k, min_score, self.bound * float(np.linalg.norm(q)))
        if self.ann and not exact and (allowed is None or len(allowed) > EXACT_FILTER_ROWS):
            members = self._ivf_members(q, k, allowed)
            if members is not None:
                return self._ranked(*self._best_of(members, query), query)
        if allowed is None or len(allowed) > MASK_SHARE * len(self.planes):
            found = self._scan_all(query, allowed)
        else:
            found = self._best_of(allowed, query)
        return self._ranked(*found, query)

    # -- the passes ------------------------------------------------------------

    def _approx(self, q16, slots: np.ndarray | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        """First-pass cosines (float32) of the rows at ``slots``, or of rows start:stop of the high plane."""
        import torch

        high = self.planes.high_tensor()
        if slots is None:
            rows, inv = high[start:stop], self.inv_norms[start:stop]
        else:
            rows, inv = high.index_select(0, torch.from_numpy(slots)), self.inv_norms[slots]
        scores = torch.mv(rows, q16).float().numpy()
        scores *= inv
        return scores

    def _exact(self, slots: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact cosines (float64) of the rows at ``slots``, joined from both planes chunk by chunk.

        The float32 values summed in float64 by numpy's own loop (not BLAS: no
        threads left spinning): the same score for a row whichever path
        scores it, and near-ties ordered as the vectors are, not as one
        float32 summation order happens to round them.
        """
        out = np.empty(len(slots), dtype=np.float64)
        q64 = q.astype(np.float64)
        for start in range(0, len(slots), CHUNK):
            part = slots[start:start + CHUNK]
            out[start:start + CHUNK] = np.einsum("ij,j->i", self.planes[part], q64) * self.inv_norms[part]
        return out

    def _refine(self, slots: np.ndarray, approx: np.ndarray, query: "_Query"):
        """(slots, exact scores) of every row whose approximate score could place it in the answer."""
        slots = slots[_passing(approx, query, min_score=True)]
        return slots, self._exact(slots, query.q)

    def _best_of(self, slots: np.ndarray, query: "_Query"):
        """(slots, exact scores) holding the answer among the rows at ``slots`` (sorted)."""
        if len(slots) <= DIRECT_ROWS:
            return slots, self._exact(slots, query.q)
        approx = np.concatenate([self._approx(query.q16(), slots[i:i + CHUNK]) for i in range(0, len(slots), CHUNK)])
        return self._refine(slots, approx, query)

    def _scan_all(self, query: "_Query", allowed: np.ndarray | None):
        """Every row scanned; per chunk only the rows that could still make the answer are kept."""
        n = len(self.planes)
        mask = None
        if allowed is not None:
            mask = np.zeros(n, dtype=bool)
            mask[allowed] = True
        elif len(self.dead):
            mask = self._live_mask
        keep_slots, keep_approx = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]  # a file with no rows: none
        for start in range(0, n, SCAN_CHUNK):
            stop = min(n, start + SCAN_CHUNK)
            approx = self._approx(query.q16(), start=start, stop=stop)
            if mask is not None:
                approx[~mask[start:stop]] = -np.inf
            # This chunk's k-th best is at most the whole file's: its floor keeps a superset of the answer.
            keep = _passing(approx, query, min_score=False)
            keep_slots.append(keep + start)
            keep_approx.append(approx[keep])
        slots, approx = np.concatenate(keep_slots), np.concatenate(keep_approx)
        return self._refine(slots, approx, query)

    def _ivf_members(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray | None:
        """The sorted slots of the nearest lists' members; None when fewer than k members pass the filter."""
        near = _best(np.einsum("ij,j->i", self.centroids, q), self.nprobe)
        parts = [self._members[self._offsets[c]:self._offsets[c + 1]] for c in near]
        slots = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        if allowed is not None:
            slots = slots[np.isin(slots, allowed, assume_unique=True)]
        if len(slots) < min(k, self.live if allowed is None else len(allowed)):
            return None
        return slots

    def _ranked(self, slots: np.ndarray, scores: np.ndarray, query: "_Query") -> list[tuple[int, float]]:
        if query.min_score is not None:
            keep = scores >= query.min_score
            slots, scores = slots[keep], scores[keep]
        if len(scores) > query.k:  # every row tied with the k-th best stays in, so ties go by id below
            keep = scores >= _kth_largest(scores, query.k)
            slots, scores = slots[keep], scores[keep]
        ids = self.slot_ids[slots]
        order = np.lexsort((ids, -scores))[:query.k]
        return [(int(ids[i]), float(scores[i])) for i in order]


class _Query:
    """One query's unit vector, k, score floor and error bound (error_bound times |q|)."""

    def __init__(self, q: np.ndarray, k: int, min_score, bound: float):
        self.q, self.k, self.min_score, self.bound = q, k, min_score, bound
        self._q16 = None

    def q16(self):
        if self._q16 is None:
            import torch

            self._q16 = torch.from_numpy(self.q).to(torch.bfloat16)
        return self._q16


def _passing(approx: np.ndarray, query: _Query, *, min_score: bool) -> np.ndarray:
    """Positions of the approximate scores that could belong to the answer.

    A row's exact score lies within ``query.bound`` of its approximate one, so
    the k-th best exact score is at least the k-th best approximate one minus
    the bound, and a row of the answer scores at least that: its approximate
    score is at least the k-th best minus twice the bound (and at least
    --min-score minus the bound). Excluded rows (-inf) never pass.
    """
    floor = _kth_largest(approx, query.k) - 2 * query.bound if len(approx) > query.k else -np.inf
    if min_score and query.min_score is not None:
        floor = max(floor, query.min_score - query.bound)
    keep = np.flatnonzero(approx >= floor)
    return keep[np.isfinite(approx[keep])]


def _kth_largest(scores: np.ndarray, k: int) -> float:
    return float(np.partition(scores, len(scores) - k)[len(scores) - k])


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k highest scores (unordered; all of them when there are at most k)."""
    if len(scores) <= k:
        return np.arange(len(scores))
    # The k largest from the top of the partition: no negated copy of a million scores.
    return np.argpartition(scores, len(scores) - k)[len(scores) - k:]
