"""Reciprocal-rank fusion: merge ranked lists without comparing their scores.

BM25 scores and cosine similarities live on unrelated scales, so hybrid
search fuses ranks instead: score(d) = sum over lists of 1 / (k_rrf + rank),
rank counting from 1, a list that misses d contributing nothing. k_rrf=60 is
the constant from Cormack, Clarke & Buettcher (SIGIR 2009); it damps the
difference between the very top ranks.
"""

from __future__ import annotations

from typing import Hashable, Sequence

K_RRF = 60


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Hashable]], k_rrf: int = K_RRF
) -> list[tuple[Hashable, float, tuple[int | None, ...]]]:
    """(item, fused score, its 1-based rank in each input list or None), best first.

    Ties are broken by the best single rank, then by the item itself, so the
    order is deterministic.
    """
    scores: dict = {}
    ranks: dict = {}
    for i, ranking in enumerate(rankings):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k_rrf + rank)
            ranks.setdefault(item, [None] * len(rankings))[i] = rank
    def order(item):
        best = min(r for r in ranks[item] if r is not None)
        return (-scores[item], best, item)
    return [(item, scores[item], tuple(ranks[item])) for item in sorted(scores, key=order)]
