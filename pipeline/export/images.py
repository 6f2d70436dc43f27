"""Rows that point at a readable image, and copying those images into an export tree.

An image that was captioned but is gone or unreadable now (moved, deleted,
permissions) is skipped and counted, like any bad input: the rest of the
export goes on. So is one whose copy would land on another indexed image
(``--out`` inside the images with --allow-out-in-images): that image is
never replaced (pipeline.export.storage.ExportFolder).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from pipeline.export.errors import ExportError
from pipeline.export.rows import ExportRow
from pipeline.export.storage import SOURCE_IMAGE, ExportFolder, Storage

UNREADABLE = "image missing or unreadable"


def image_rows(rows: Iterable[ExportRow], skipped: Counter, *, need_caption: bool = False) -> Iterable[ExportRow]:
    """Rows whose image decoded (status ok): the only ones a dataset can hold."""
    for row in rows:
        if row.status != "ok":
            skipped["status " + row.status] += 1
        elif need_caption and not (row.caption and row.caption.strip()):
            skipped["no caption"] += 1
        else:
            yield row


def copied(dest: ExportFolder, uri: str, rel: str, *, link: bool, skipped: Counter) -> bool:
    """Copy (or link) the image to ``rel`` in the export folder; False, counted in ``skipped``, when it cannot
    be read or its place is another indexed image (which an export never replaces)."""
    try:
        if link and not dest.storage.exists(uri):
            raise FileNotFoundError(uri)
        placed = dest.copy_image(uri, rel, link=link)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        skipped[UNREADABLE] += 1
        return False
    if not placed:
        skipped[SOURCE_IMAGE] += 1
    return placed


def image_bytes(storage: Storage, uri: str, skipped: Counter) -> bytes | None:
    try:
        return storage.read(uri)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        skipped[UNREADABLE] += 1
        return None


def nothing_to_export(skipped: Counter) -> ExportError:
    """The error for a dataset export left with no image (an empty dataset no reader loads)."""
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "no rows"
    return ExportError(f"no image to export ({why}); a dataset needs status=ok rows with readable images: check --status, --where, --probe")
