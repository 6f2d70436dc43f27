"""Which images go to review: ``--sample N``, the same N images for the same rows and seed.

  * ``uncertainty``: the images whose least certain yes/no probe has
    ``yes_prob`` nearest 0.5 first: where a person's label teaches the most.
    Rows without a probability come last.
  * ``stratified``: every (yes/no question, model answer) pair gets its
    share: the strata are visited in turn, each giving its next image, so
    rare answers ("yes" to a question almost always "no") are reviewed too.
    Without yes/no questions, a plain random sample.

Ties and the order within a stratum follow a hash of the seed and the
image (``image_id``, else uri): deterministic, but not the listing order.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from pipeline.export.rows import ExportRow
from pipeline.probes import is_yes_no_question

STRATEGIES = ("uncertainty", "stratified")


def shuffle_key(row: ExportRow, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{row.image_id or row.uri}".encode()).hexdigest()


def uncertainty(row: ExportRow) -> float:
    """Distance of the least certain yes/no probe's yes_prob from 0.5 (2.0 when the row has none)."""
    distances = [abs(p.yes_prob - 0.5) for p in row.probes if p.yes_prob is not None and is_yes_no_question(p.question)]
    return min(distances) if distances else 2.0


def sample(rows: Sequence[ExportRow], n: int, *, strategy: str, seed: int = 0) -> list[ExportRow]:
    """``n`` of ``rows`` (all of them when there are fewer), in review order."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sample strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    ordered = sorted(rows, key=lambda r: shuffle_key(r, seed))
    if strategy == "uncertainty":
        return sorted(ordered, key=uncertainty)[:n]  # stable: ties keep the hash order
    return _stratified(ordered, n)


def _stratified(ordered: list[ExportRow], n: int) -> list[ExportRow]:
    strata: dict[tuple[str, bool], list[ExportRow]] = {}
    for row in ordered:
        for probe in row.probes:
            if probe.answer_bool is not None and is_yes_no_question(probe.question):
                strata.setdefault((probe.question, probe.answer_bool), []).append(row)
    if not strata:
        return ordered[:n]
    queues = [strata[key] for key in sorted(strata)]
    positions = [0] * len(queues)
    picked: dict[int, ExportRow] = {}
    while len(picked) < n and any(p < len(q) for p, q in zip(positions, queues)):
        for i, queue in enumerate(queues):
            while positions[i] < len(queue) and queue[positions[i]].id in picked:
                positions[i] += 1
            if positions[i] < len(queue) and len(picked) < n:
                picked[queue[positions[i]].id] = queue[positions[i]]
                positions[i] += 1
    if len(picked) < n:  # rows with no yes/no answer at all fill what is left
        for row in ordered:
            if len(picked) >= n:
                break
            picked.setdefault(row.id, row)
    return list(picked.values())
