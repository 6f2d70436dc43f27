"""How often the model's probe answers agree with people's: ``captioner report probes``.

Joined by ``image_id``: every labeled image that is in the output (labels of
images no longer there are counted, not used). Per yes/no question, over the
images a person answered it for:

  * accuracy: the model's parsed answer equals the person's (an answer that
    was neither yes nor no counts as wrong);
  * precision and recall of "yes" (None when nothing was predicted yes / no
    person said yes);
  * calibration: ``yes_prob`` in ``bins`` equal-width buckets ([0, 0.1),
    ..., [0.9, 1.0], the last one closed, as scikit-learn's
    ``calibration_curve(strategy="uniform")`` bins), each with its count,
    mean ``yes_prob`` and the share people said yes;
  * the threshold for a precision: the lowest ``t`` among the reviewed
    ``yes_prob`` values with precision(``yes_prob >= t``) >= the asked
    precision, i.e. the most recall that precision allows (scikit-learn's
    ``precision_recall_curve`` convention), with a ``--probe "Q>=t"`` filter
    that search and the exports take.

Open questions get the share of answers equal to the person's (case and
spacing ignored); the caption, how many were kept as the model wrote them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

from pipeline.export.rows import ExportRow
from pipeline.labels.fields import NO, YES
from pipeline.probes import is_yes_no_question

DEFAULT_BINS = 10
DEFAULT_PRECISION = 0.95


@dataclass(frozen=True)
class Bucket:
    low: float
    high: float
    count: int
    mean_yes_prob: float | None
    yes_rate: float | None  # share of these images people said yes to


@dataclass(frozen=True)
class Threshold:
    asked_precision: float
    threshold: float | None  # None: no threshold reaches the precision on the reviewed images
    precision: float | None
    recall: float | None
    selected: int  # reviewed images with yes_prob >= threshold
    probe_filter: str | None  # for --probe


@dataclass(frozen=True)
class ProbeReport:
    question: str
    kind: str  # "yes/no" or "text"
    reviewed: int
    accuracy: float | None
    precision: float | None = None
    recall: float | None = None
    counts: dict = field(default_factory=dict)  # tp, fp, fn, tn, unparsed (model said neither)
    calibration: list[Bucket] = field(default_factory=list)
    threshold: Threshold | None = None
    with_yes_prob: int = 0  # reviewed images that have a yes_prob
    curve: list = field(default_factory=list)  # pr_curve: (threshold, precision, recall, selected)


@dataclass(frozen=True)
class Report:
    labeled_images: int  # labels in the output (joined)
    labels_not_in_output: int
    caption_reviewed: int
    caption_kept: int
    probes: list[ProbeReport]

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _same_text(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and " ".join(a.lower().split()) == " ".join(b.lower().split())


def make_report(rows: Iterable[ExportRow], labels: dict[str, dict], questions: tuple[str, ...], *,
                precision: float = DEFAULT_PRECISION, bins: int = DEFAULT_BINS) -> Report:
    by_id: dict[str, ExportRow] = {}
    for row in rows:
        if row.image_id and row.image_id not in by_id:
            by_id[row.image_id] = row
    joined = [(by_id[image_id], entry) for image_id, entry in sorted(labels.items()) if image_id in by_id]
    captioned = [(row, e) for row, e in joined if e.get("caption") is not None and row.caption]
    kept = sum(_same_text(row.caption, e["caption"]) for row, e in captioned)
    reports = []
    for question in questions:
        pairs = [(row.answer(question), e["answers"][question]) for row, e in joined if question in (e.get("answers") or {})]
        if is_yes_no_question(question):
            reports.append(_yes_no(question, [(p, h == YES) for p, h in pairs if h in (YES, NO)], precision, bins))
        else:
            agree = sum(_same_text(p.answer if p else None, h) for p, h in pairs)
            reports.append(ProbeReport(question, "text", len(pairs), _ratio(agree, len(pairs))))
    return Report(len(joined), len(labels) - len(joined), len(captioned), kept, reports)


def _yes_no(question: str, pairs: list, asked: float, bins: int) -> ProbeReport:
    model = [p.answer_bool if p else None for p, _ in pairs]
    human = [h for _, h in pairs]
    tp = sum(m is True and h for m, h in zip(model, human))
    fp = sum(m is True and not h for m, h in zip(model, human))
    fn = sum(m is not True and h for m, h in zip(model, human))
    tn = sum(m is False and not h for m, h in zip(model, human))
    unparsed = sum(m is None for m in model)
    correct = sum(m is not None and m == h for m, h in zip(model, human))
    scored = [(p.yes_prob, h) for p, h in pairs if p is not None and p.yes_prob is not None]
    return ProbeReport(
        question, "yes/no", len(pairs), _ratio(correct, len(pairs)),
        precision=_ratio(tp, tp + fp), recall=_ratio(tp, tp + fn),
        counts={"tp": tp, "fp": fp, "fn": fn, "tn": tn, "unparsed": unparsed},
        calibration=calibration(scored, bins), threshold=threshold_for(question, scored, asked),
        with_yes_prob=len(scored), curve=pr_curve(scored),
    )


def calibration(scored: list[tuple[float, bool]], bins: int = DEFAULT_BINS) -> list[Bucket]:
    """Every bucket of [0, 1] in ``bins`` equal parts (the last one includes 1.0), empty ones too."""
    import numpy as np

    edges = np.linspace(0.0, 1.0, bins + 1)  # the edges and the search below are calibration_curve's
    buckets = [[] for _ in range(bins)]
    for prob, human in scored:
        buckets[int(np.searchsorted(edges[1:-1], prob, side="right"))].append((prob, human))
    out = []
    for i, members in enumerate(buckets):
        n = len(members)
        out.append(Bucket(
            low=round(float(edges[i]), 6), high=round(float(edges[i + 1]), 6), count=n,
            mean_yes_prob=sum(p for p, _ in members) / n if n else None,
            yes_rate=sum(h for _, h in members) / n if n else None,
        ))
    return out


def pr_curve(scored: list[tuple[float, bool]]) -> list[tuple[float, float, float | None, int]]:
    """(t, precision, recall, selected) of ``yes_prob >= t`` for every reviewed yes_prob t, ascending."""
    positives = sum(h for _, h in scored)
    curve = []
    for t in sorted({p for p, _ in scored}):
        chosen = [h for p, h in scored if p >= t]
        tp = sum(chosen)
        curve.append((t, tp / len(chosen), _ratio(tp, positives), len(chosen)))
    return curve


def threshold_for(question: str, scored: list[tuple[float, bool]], asked: float) -> Threshold:
    """The lowest reviewed yes_prob t whose selection (yes_prob >= t) has precision >= ``asked``."""
    for t, precision, recall, selected in pr_curve(scored):
        if precision >= asked and precision > 0:
            return Threshold(asked, t, precision, recall, selected, f"{question}>={_short_floor(t, scored)}")
    return Threshold(asked, None, None, None, 0, None)


def _short_floor(t: float, scored: list[tuple[float, bool]]) -> str:
    """``t`` rounded down to the fewest decimals that select the same reviewed images.

    Rounded down, never to nearest: ``yes_prob`` is a float32, and 0.802 stored
    is 0.80199998, which ``>= 0.802`` would leave out.
    """
    for decimals in range(1, 7):
        cut = math.floor(t * 10**decimals) / 10**decimals
        if not any(cut <= p < t for p, _ in scored):
            return f"{cut:.{decimals}f}"
    return repr(t)
