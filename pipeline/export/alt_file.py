"""``captioner export alt-text``: a CSV or JSON-lines file of alt texts keyed by uri, for CMS imports.

The ``--out`` suffix picks the format (``.csv`` or ``.jsonl``). One record
per captioned image, in uri order, with the columns:

  uri                 the image, as stored in the captions (path or URL)
  alt_text            pipeline.export.alt_text rules (first sentence, capped, no "image of")
  caption             the full caption it came from (an extended description)
  machine_generated   always true: the text was written by a model, not a person
  generator           the captioning model as id@revision
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Iterable

from pipeline.export.alt_text import alt_text_with_text
from pipeline.export.errors import ExportError
from pipeline.export.rows import ExportRow
from pipeline.export.sidecars import captioned
from pipeline.export.storage import ExportFolder
from pipeline.storage import name_of

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
COLUMNS = ("uri", "alt_text", "caption", "machine_generated", "generator")


def alt_format(out: str) -> str:
    suffix = "." + out.rsplit(".", 1)[-1].lower() if "." in out.rsplit("/", 1)[-1] else ""
    if suffix not in FORMATS:
        raise ExportError(f"--out {out}: alt-text writes .csv or .jsonl; end the file name with one of them")
    return FORMATS[suffix]


def alt_records(rows: Iterable[ExportRow], max_chars: int, skipped: Counter) -> Iterable[dict]:
    for row in captioned(rows, skipped):
        # The short caption when there is one, and the legible text read in the image, quoted (alt_text.py).
        text = alt_text_with_text(row.alt_caption, row.text, max_chars)
        if text is None:
            skipped["caption without words"] += 1
            continue
        caption = " ".join(row.caption.split())
        yield {"uri": row.uri, "alt_text": text, "caption": caption, "machine_generated": True, "generator": row.generator}


def write_alt_text(rows: Iterable[ExportRow], out: str, dest: ExportFolder, *, max_chars: int, skipped: Counter) -> int:
    """Write the file ``out`` through ``dest`` (the ExportFolder of its parent: a user's own file there is kept)."""
    kind = alt_format(out)
    file = name_of(out)
    dest.prepare([file])
    written = 0
    with dest.open_write(file) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        if kind == "csv":
            writer = csv.DictWriter(text, fieldnames=COLUMNS)
            writer.writeheader()
            for record in alt_records(rows, max_chars, skipped):
                writer.writerow({**record, "machine_generated": "true"})
                written += 1
        else:
            for record in alt_records(rows, max_chars, skipped):
                text.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        text.flush()
        text.detach()  # leave the binary handle open for open_write to publish
    return written
