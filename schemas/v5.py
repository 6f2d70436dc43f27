"""Schema v5: v4 plus the text read in the image (OCR) and a second, short caption.

Changes from v4 (schemas/v4.py, whose table this one is derived from):
  * caption_short  string, right after ``caption_truncated``: the short caption
                   when the run asked for two lengths (``--caption-length
                   short,normal``; ``caption`` then holds the longer one); null
                   otherwise. Alt text starts from it.
  * text           string, right after ``probes``: the text the OCR model read,
                   one line of the image per line, in reading order; '' when
                   OCR ran and found no text; null when OCR was off or failed.
  * text_lines     list<struct<text, confidence, box>>, after ``text``: each
                   line read, with the model's confidence (0..1) and its box as
                   four corners (x1, y1, ... x4, y4, clockwise from top-left) in
                   the pixels of the image as decoded (``width`` x ``height``).
  * ocr_model, ocr_revision  strings, after ``embed_revision``: the OCR engine
                   (package) and what identifies its weights (package version
                   and the sha256 of each model file); null when OCR was off.
All are nullable; a v1..v4 file upgraded with ``schemas.upgrade_table`` has
them null (unknown: OCR never ran), never ''.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.v4 import V4

SCHEMA_VERSION = 5

TEXT_LINE_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("box", pa.list_(pa.float32(), 8)),
    ]
)

NEW_PROBE_FIELDS: tuple[pa.Field, ...] = ()
# Added columns: name -> the column each follows.
NEW_COLUMNS = {
    "caption_truncated": (
        ("caption_short", pa.string(), True,
         "the short caption when two lengths were asked (--caption-length short,normal; caption holds the longer); "
         "null otherwise"),
    ),
    "probes": (
        ("text", pa.string(), True,
         "text read in the image by OCR, one line per line in reading order; '' when OCR found none; "
         "null when OCR was off or failed"),
        ("text_lines", pa.list_(TEXT_LINE_TYPE), True,
         "each line OCR read: text, confidence (0..1), box (4 corners x1,y1..x4,y4 in decoded-image pixels)"),
    ),
    "embed_revision": (
        ("ocr_model", pa.string(), True, "OCR engine id (its package), null when OCR was off"),
        ("ocr_revision", pa.string(), True, "OCR package version and the sha256 of each of its model files"),
    ),
}

V5 = V4.changed(
    SCHEMA_VERSION,
    probe_fields=NEW_PROBE_FIELDS,
    columns_after=NEW_COLUMNS,
    docs={"schema_version": "schema version the row was written under: 5 (1 to 4 in rows upgraded from older files)"},
)

SCHEMA = V5  # what schemas.upgrade reads
PROBE_TYPE = V5.probe_type
COLUMN_NAMES = V5.column_names
output_schema = V5.output_schema
describe = V5.describe
