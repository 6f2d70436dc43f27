"""IVF lists for large indexes: k-means centroids trained with faiss, slots assigned to their nearest one.

faiss trains and assigns; the scan itself is pipeline.search.scan's over the
one vector file, so the index holds the vectors once (faiss's own IVFFlat
would store a second copy, IVF-PQ a lossy one) and a filter restricts exactly
the members it scans. New vectors are assigned to the trained centroids
without retraining until the index has grown by ``RETRAIN_GROWTH`` since the
centroids were trained (the data may have drifted); then the update rebuilds
the vectors whole.
"""

from __future__ import annotations

import numpy as np

# Train on at most this many sampled rows (faiss wants >= 39 per list; 64 per list at 1,000 lists).
TRAIN_ROWS = 65_536
# ... but no more than this many per list (faiss wants at least 39): 48k rows for 1,000 lists
TRAIN_PER_LIST = 48
KMEANS_ITERATIONS = 10
# Retrain once the index holds this much more than when it was trained (1.5: 50% more rows).
RETRAIN_GROWTH = 1.5
ASSIGN_CHUNK = 65_536


def list_count(rows: int) -> int:
    """IVF lists for ``rows`` vectors: about sqrt(rows) (1,000 at 1M), at most 4,096."""
    return int(max(1, min(4096, round(rows ** 0.5))))


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def train(matrix: np.ndarray, lists: int, seed: int = 0) -> np.ndarray:
    """Unit-length centroids (lists x dim) of a sample of ``matrix``'s rows (spherical k-means)."""
    import faiss

    n, dim = matrix.shape
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, TRAIN_ROWS, TRAIN_PER_LIST * lists), replace=False))
    x = unit_rows(matrix[sample])
    lists = min(lists, len(x))
    kmeans = faiss.Kmeans(dim, lists, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, -(-len(x) // lists)))
    kmeans.train(x)
    return unit_rows(kmeans.centroids)


def assign(centroids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The list (nearest centroid by cosine) of each row, int32."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(rows), dtype=np.int32)
    for start in range(0, len(rows), ASSIGN_CHUNK):
        _, nearest = index.search(unit_rows(rows[start:start + ASSIGN_CHUNK]), 1)
        out[start:start + ASSIGN_CHUNK] = nearest[:, 0]
    return out
