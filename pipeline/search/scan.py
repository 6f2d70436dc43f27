"""Top-k cosine search over the vector file: exact BLAS scans, and IVF lists above a row count.

Exact: the query times the memory-mapped float32 matrix (numpy's BLAS, every
core), in chunks of ``SCAN_CHUNK`` rows, ``argpartition`` per chunk, merged.
Scores are cosine similarities: the dot product times the stored inverse norm
(the file keeps the raw vectors, so ``captioner sql`` returns them unchanged).

Filtered: DuckDB turns the filter into a set of ids (pipeline.search.filters);
only their slots are scanned, so the answer is exact and complete at any
selectivity (k results whenever k rows match). Above ``MASK_SHARE`` of the
rows it is cheaper to scan everything and mask than to gather the rows.

ANN (IVF): k-means centroids (pipeline.search.ann trains them with faiss);
each slot belongs to the list of its nearest centroid; a query scans the
``nprobe`` lists whose centroids are nearest, exactly. A filter restricts the
probed lists' members; when fewer than k members pass, or the filter keeps
fewer than ``EXACT_FILTER_ROWS`` rows, the matching rows are scanned exactly.

Ties are broken by id, so every path orders equal scores the same way.
"""

from __future__ import annotations

import numpy as np

CHUNK = 65_536  # rows gathered per product (filtered scans, IVF lists)
# Rows per product in a full scan: one BLAS call over the whole mapped matrix up to 4M rows (16 MB of
# scores). bench/search.py, 1M x 768: 187 ms in one call against 268 ms in 65k-row chunks and 199 ms
# for numpy over the same matrix in RAM.
SCAN_CHUNK = 4_194_304
# Below this many gathered rows a product runs on one core (see VectorStore._scores).
SMALL_PRODUCT = 16_384
# A filter keeping more than this share of the rows: scan all rows and mask, rather than gather.
MASK_SHARE = 0.3
# A filter keeping at most this many rows is answered by an exact scan of those rows, even with ANN:
# gathering them costs about what probing the lists does (bench/search.py).
EXACT_FILTER_ROWS = 20_000


def default_nprobe(lists: int) -> int:
    """IVF lists probed per query: 1/128 of them, at least 8 (all of them for tiny indexes).

    bench/search.py (1M x 768, 1,000 lists, its clustered synthetic vectors):
    nprobe 8 and 16 both gave recall@10 1.000; 16 took 2-3x as long (93-107 ms
    against 34-48 ms on the loaded 2-core machine), over the 0.2x-of-exact
    budget. Real embeddings are less clustered: raise --nprobe when recall matters more.
    """
    return max(1, min(lists, max(8, -(-lists // 128))))


class VectorStore:
    """The vectors of one opened index: the matrix, slot -> id, inverse norms, and the IVF lists if any."""

    def __init__(self, matrix: np.ndarray, slot_ids: np.ndarray, inv_norms: np.ndarray, id_count: int,
                 lists: np.ndarray | None = None, centroids: np.ndarray | None = None, nprobe: int | None = None):
        self.matrix = matrix
        self._array = np.asarray(matrix)  # a plain ndarray over the same mapped pages (no memmap subclass per slice)
        self.slot_ids = slot_ids  # int64 per slot; -1: a dead slot
        self.inv_norms = inv_norms  # float32 per slot; 0 for dead slots
        self.dead = np.flatnonzero(slot_ids < 0)
        self.id_to_slot = np.full(max(int(id_count), int(slot_ids.max(initial=-1)) + 1), -1, dtype=np.int64)
        live = slot_ids >= 0
        self._live_mask = live
        self.id_to_slot[slot_ids[live]] = np.flatnonzero(live)
        self.live = int(live.sum())
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
        return None if slot < 0 else np.array(self.matrix[slot])

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
        allowed = None if allowed_ids is None else self.slots_of(allowed_ids)
        if allowed is not None and len(allowed) == 0:
            return []
        if self.ann and not exact and (allowed is None or len(allowed) > EXACT_FILTER_ROWS):
            found = self._ivf(q, k, allowed)
            if found is not None:
                return self._ranked(*found, k, min_score)
        if allowed is None or len(allowed) > MASK_SHARE * len(self.matrix):
            slots, scores = self._scan_all(q, k, allowed)
        else:
            slots, scores = allowed, self._scores(allowed, q)
        return self._ranked(slots, scores, k, min_score)

    # -- the scans -------------------------------------------------------------

    def _scores(self, slots: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Cosine of the rows at ``slots`` (sorted), gathered chunk by chunk."""
        out = np.empty(len(slots), dtype=np.float32)
        for start in range(0, len(slots), CHUNK):
            part = slots[start:start + CHUNK]
            rows = np.take(self._array, part, axis=0)
            # A few thousand rows (the probed IVF lists, a selective filter): numpy's own loop on one
            # core; BLAS's threads cost more to wake than such a product takes (0.6 ms against 5-25 ms
            # for 3,000 x 768 on the shared 2-core machine).
            dots = np.einsum("ij,j->i", rows, q) if len(part) < SMALL_PRODUCT else rows @ q
            out[start:start + CHUNK] = dots * self.inv_norms[part]
        return out

    def _scan_all(self, q: np.ndarray, k: int, allowed: np.ndarray | None):
        """Every row scanned; per chunk only its best candidates are kept."""
        n = len(self.matrix)
        keep_slots, keep_scores = [], []
        mask = None
        if allowed is not None:
            mask = np.zeros(n, dtype=bool)
            mask[allowed] = True
        elif len(self.dead):
            mask = self._live_mask
        for start in range(0, n, SCAN_CHUNK):
            stop = min(n, start + SCAN_CHUNK)
            scores = self._array[start:stop] @ q
            scores *= self.inv_norms[start:stop]  # in place: no second 4 MB-per-million array
            if mask is not None:
                scores[~mask[start:stop]] = -np.inf
            best = _best(scores, k)
            keep_slots.append(best + start)
            keep_scores.append(scores[best])
        slots, scores = np.concatenate(keep_slots), np.concatenate(keep_scores)
        finite = np.isfinite(scores)
        return slots[finite], scores[finite]

    def _ivf(self, q: np.ndarray, k: int, allowed: np.ndarray | None):
        """(slots, scores) of the members of the nearest lists; None when fewer than k members pass the filter."""
        near = _best(self.centroids @ q, self.nprobe)
        parts = [self._members[self._offsets[c]:self._offsets[c + 1]] for c in near]
        slots = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        if allowed is not None:
            slots = slots[np.isin(slots, allowed, assume_unique=True)]
        if len(slots) < min(k, self.live if allowed is None else len(allowed)):
            return None
        return slots, self._scores(slots, q)

    def _ranked(self, slots: np.ndarray, scores: np.ndarray, k: int, min_score) -> list[tuple[int, float]]:
        if min_score is not None:
            keep = scores >= min_score
            slots, scores = slots[keep], scores[keep]
        best = _best(scores, k)
        ids = self.slot_ids[slots[best]]
        order = np.lexsort((ids, -scores[best]))
        return [(int(ids[i]), float(scores[best][i])) for i in order]


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k highest scores (unordered; all of them when there are at most k)."""
    if len(scores) <= k:
        return np.arange(len(scores))
    # The k largest from the top of the partition: no negated copy of a million scores.
    return np.argpartition(scores, len(scores) - k)[len(scores) - k:]
