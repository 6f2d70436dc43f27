"""``captioner export imagefolder``: a Hugging Face ``imagefolder`` dataset folder.

  OUT/metadata.jsonl        one line per image: file_name, caption, image_id,
                            one column per probe question (pipeline.export.labels),
                            and with --trigger/--style tags a ``text`` column
                            (pipeline.export.training_text)
  OUT/<relative path>       the images, copied (or symlinked with --link),
                            mirroring their folders below the root

``datasets.load_dataset("imagefolder", data_dir=OUT)`` reads it (split "train").
Every file goes through pipeline.export.storage.ExportFolder: a user's own
file at a destination is refused before anything is written (unless
--overwrite), and an indexed image is never replaced.
"""

from __future__ import annotations

import json
from collections import Counter

from pipeline.export.images import copied, image_rows, nothing_to_export
from pipeline.export.labels import probe_columns, probe_values
from pipeline.export.rows import RowSource
from pipeline.export.storage import ExportFolder, relative_paths
from pipeline.export.training_text import TrainingText

METADATA = "metadata.jsonl"


def write_imagefolder(source: RowSource, dest: ExportFolder, *, root: str | None, link: bool, skipped: Counter,
                      text: TrainingText | None = None) -> int:
    relative = relative_paths(source.uris(), root, tree=source.tree_uris())
    columns = probe_columns(source.questions)
    dest.prepare([METADATA, *(relative[row.uri] for row in image_rows(source.rows(), Counter()))])
    written = 0
    with dest.open_write(METADATA) as handle:
        for row in image_rows(source.rows(), skipped):
            rel = relative[row.uri]
            if not copied(dest, row.uri, rel, link=link, skipped=skipped):
                continue
            record = {"file_name": rel, "caption": row.caption, "image_id": row.image_id}
            if text is not None and not text.plain:
                record["text"] = text.of(row)
            record.update(probe_values(row, columns, source.has_yes_prob))
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            written += 1
        if not written:
            raise nothing_to_export(skipped)  # inside the block: no empty metadata.jsonl is published
    return written
