"""Probe answers as dataset columns, shared by the imagefolder and hf-dataset exports.

Each probe question becomes one column named after it (``Is there a person
in the image?`` -> ``is_there_a_person_in_the_image``):

  * a yes/no question (pipeline.probes.is_yes_no_question) gives a boolean
    column: the parsed answer, null when the model answered neither yes nor no;
  * any other question gives the answer text;
  * when the probes carry a probability of "yes" (``yes_prob``, schema v2),
    yes/no questions also get ``<column>_yes_prob`` (float).
"""

from __future__ import annotations

import re

from pipeline.export.rows import ExportRow
from pipeline.probes import is_yes_no_question

RESERVED = {"file_name", "image", "caption", "text", "image_id", "uri", "width", "height"}
MAX_NAME = 64


def probe_columns(questions: tuple[str, ...]) -> dict[str, str]:
    """question -> column name: lower-case words joined by '_', unique, never a reserved name."""
    names: dict[str, str] = {}
    used = set(RESERVED)
    for question in questions:
        base = re.sub(r"[^0-9a-z]+", "_", question.lower()).strip("_")[:MAX_NAME].rstrip("_") or "probe"
        if base[0].isdigit():
            base = "q_" + base
        name, n = base, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names[question] = name
    return names


def is_boolean(question: str) -> bool:
    return is_yes_no_question(question)


def probe_values(row: ExportRow, columns: dict[str, str], with_yes_prob: bool) -> dict:
    """The row's answers under their column names (null for a question the row lacks)."""
    out = {}
    for question, name in columns.items():
        probe = row.answer(question)
        if is_boolean(question):
            out[name] = probe.answer_bool if probe else None
            if with_yes_prob:
                out[name + "_yes_prob"] = probe.yes_prob if probe else None
        else:
            out[name] = probe.answer if probe else None
    return out


def feature_types(columns: dict[str, str], with_yes_prob: bool) -> dict[str, str]:
    """Column name -> 'bool' / 'string' / 'float': the types probe_values produces."""
    types = {}
    for question, name in columns.items():
        if is_boolean(question):
            types[name] = "bool"
            if with_yes_prob:
                types[name + "_yes_prob"] = "float"
        else:
            types[name] = "string"
    return types
