"""``captioner export txt``: one ``.txt`` caption per image, the layout kohya-ss
and TagGUI-style trainers read (``photo.jpg`` -> ``photo.txt``, same folder).

The file holds the caption, whitespace-normalised, UTF-8, no trailing
newline; when OCR read legible text in the image it follows the caption as
``Text: "LINE / LINE"`` (pipeline.export.alt_text.legible_text), so a model
trained on the pairs learns the words it sees. With ``--trigger``/``--style
tags`` it holds the training text pipeline.export.training_text makes of the
row instead. An existing ``.txt`` is kept (it may be hand-edited) unless
``overwrite``; one that already says the same is left alone either way.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Iterable

from pipeline.export.alt_text import legible_text
from pipeline.export.rows import ExportRow
from pipeline.export.sidecars import CREATE, KEEP, UPDATE, Placement, Plan, captioned
from pipeline.export.storage import Storage
from pipeline.export.training_text import TrainingText


def txt_name(image_name: str) -> str:
    return posixpath.splitext(image_name)[0] + ".txt"


def caption_text(caption: str, text: str | None = None) -> str:
    legible = legible_text(text)
    caption = " ".join(caption.split())
    return f'{caption} Text: "{legible}"' if legible else caption


def plan_txt(rows: Iterable[ExportRow], placement: Placement, storage: Storage, *, overwrite: bool, skipped: Counter,
             text: TrainingText | None = None) -> list[Plan]:
    text = text or TrainingText()
    rows = list(captioned(rows, skipped)) if text.style == "sentence" else [r for r in rows if _has_tags(r, text, skipped)]
    where = placement.locations([r.uri for r in rows], txt_name)
    plans = []
    for row in rows:
        location = where[row.uri]
        data = (caption_text(row.caption, row.text) if text.plain else text.of(row)).encode("utf-8")
        if not storage.exists(location):
            plans.append(Plan(row.uri, location, CREATE, data))
            continue
        old = storage.read(location)
        if old == data:
            plans.append(Plan(row.uri, location, KEEP, None, "unchanged"))
        elif overwrite:
            plans.append(Plan(row.uri, location, UPDATE, data, "replaced (--overwrite)"))
        else:
            plans.append(Plan(row.uri, location, KEEP, None, "exists; --overwrite replaces it"))
    return plans


def _has_tags(row: ExportRow, text: TrainingText, skipped: Counter) -> bool:
    if text.of(row) is None:
        skipped["no caption or yes-probe"] += 1
        return False
    return True
