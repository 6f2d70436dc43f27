"""The fields a person reviews for one image: the caption, and one per probe question.

Decided here, once, for the export (the labeling config, the predictions)
and the import (which result belongs to which question): a probe's field
name is ``probe_`` + its dataset column name (pipeline.export.labels), so it
is a valid XML name, unique, and never ``image`` or ``caption``. Yes/no
questions (pipeline.probes.is_yes_no_question) are a yes/no choice; any
other question is free text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.probes import is_yes_no_question

IMAGE = "image"
CAPTION = "caption"
YES, NO = "yes", "no"
CHOICE, TEXT = "choices", "textarea"  # Label Studio's result types for the two kinds
FORMAT = 1  # of the ``captioner`` block in each task's data; bump when its meaning changes


@dataclass(frozen=True)
class Field:
    name: str  # from_name in Label Studio
    question: str | None  # None for the caption
    kind: str  # CHOICE or TEXT

    @property
    def is_caption(self) -> bool:
        return self.question is None


def fields_for(questions: tuple[str, ...]) -> tuple[Field, ...]:
    """The caption field, then one field per probe question, in the output's order."""
    from pipeline.export.labels import probe_columns

    columns = probe_columns(tuple(questions))
    probes = tuple(Field(f"probe_{columns[q]}", q, CHOICE if is_yes_no_question(q) else TEXT) for q in questions)
    return (Field(CAPTION, None, TEXT), *probes)


def fingerprint(fields: tuple[Field, ...]) -> str:
    """A short hash of the fields (names, questions, kinds): which labeling config a task was made for."""
    spelled = [[f.name, f.question, f.kind] for f in fields]
    return hashlib.sha256(json.dumps([FORMAT, spelled]).encode()).hexdigest()[:16]


def stamp(fields: tuple[Field, ...]) -> dict:
    """What each task carries about its labeling config, read back by the import (``data.captioner``)."""
    return {
        "format": FORMAT,
        "config": fingerprint(fields),
        "fields": {f.name: f.question for f in fields if not f.is_caption},
    }
