"""Rows that point at a readable image, and copying those images into an export tree."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from pipeline.export.rows import ExportRow


def image_rows(rows: Iterable[ExportRow], skipped: Counter, *, need_caption: bool = False) -> Iterable[ExportRow]:
    """Rows whose image decoded (status ok): the only ones a dataset can hold."""
    for row in rows:
        if row.status != "ok":
            skipped["status " + row.status] += 1
        elif need_caption and not (row.caption and row.caption.strip()):
            skipped["no caption"] += 1
        else:
            yield row
