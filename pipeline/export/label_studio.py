"""``captioner export label-studio``: tasks for a Label Studio project, and its labeling config.

  OUT/tasks.json             Label Studio tasks, one per image, the model's answers as predictions
                             (pipeline.labels.label_studio.task)
  OUT/labeling-config.xml    the labeling config to paste into the project (Settings -> Labeling Interface)

How Label Studio finds the images is the user's choice (:class:`ImageLinks`):

  * ``--serve-url http://HOST:PORT``: the images as ``captioner serve`` shows
    them, by the row ids of the index it serves (so this needs ``--index``,
    the same index; ids of a ``--from`` export are temporary); serve must be
    started with ``--image-origin LABEL_STUDIO_URL``, since Label Studio
    loads images cross-origin (CORS);
  * ``--local-files-root DIR``: Label Studio's local-files storage
    (``/data/local-files/?d=PATH``, PATH below ``DIR``, which must be the
    server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT); the images must be local
    and under DIR.

``--sample N`` writes N images chosen by pipeline.labels.sample instead of
all. Both files go through ExportFolder: a user's own file of the same name
is refused unless --overwrite, and each is written whole or not at all.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

from pipeline.export.errors import ExportError
from pipeline.export.rows import ExportRow, RowSource
from pipeline.export.storage import ExportFolder
from pipeline.labels import label_studio
from pipeline.labels.fields import fields_for
from pipeline.labels.sample import sample
from pipeline.storage import is_local, local_path

TASKS = "tasks.json"
CONFIG = "labeling-config.xml"


@dataclass(frozen=True)
class ImageLinks:
    """How a task names its image: a ``captioner serve`` URL, or a Label Studio local-files path."""

    serve_url: str | None = None
    local_files_root: str | None = None

    def __post_init__(self):
        if (self.serve_url is None) == (self.local_files_root is None):
            raise ExportError(
                "label-studio needs to know how Label Studio will load the images: --serve-url http://HOST:PORT "
                "(a running `captioner serve` of this --index) or --local-files-root DIR (Label Studio's "
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT); give one"
            )
        if self.serve_url is not None and not self.serve_url.startswith(("http://", "https://")):
            raise ExportError(f"--serve-url {self.serve_url!r} is not an http(s) URL; pass the address `captioner serve` printed, e.g. http://127.0.0.1:8000")

    def url(self, row: ExportRow) -> str:
        if self.serve_url is not None:
            return label_studio.serve_url(self.serve_url, row)
        root = os.path.realpath(local_path(self.local_files_root))
        if not is_local(row.uri):
            raise ExportError(f"{row.uri} is not a local file, so Label Studio's local-files storage cannot serve it; use --serve-url with `captioner serve`")
        path = os.path.realpath(local_path(row.uri))
        if os.path.commonpath([root, path]) != root:
            raise ExportError(
                f"{row.uri} is not under --local-files-root {self.local_files_root}; pass the folder Label Studio's "
                f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT names, which must hold every exported image"
            )
        return label_studio.local_files_url(os.path.relpath(path, root).replace(os.sep, "/"))


def write_label_studio(source: RowSource, dest: ExportFolder, *, links: ImageLinks, sample_size: int | None,
                       strategy: str, seed: int, skipped: Counter) -> int:
    fields = fields_for(source.questions)
    rows = [row for row in source.rows() if _usable(row, skipped)]
    if sample_size is not None:
        rows = sample(rows, sample_size, strategy=strategy, seed=seed)
    if not rows:
        raise ExportError("no image to label (every selected row lacks an image_id: status error rows cannot be labeled); check --status, --where, --probe")
    tasks = [label_studio.task(row, fields, links.url(row)) for row in rows]  # every URL checked before writing
    dest.prepare([TASKS, CONFIG])
    with dest.open_write(CONFIG) as handle:
        handle.write(label_studio.labeling_config(fields).encode("utf-8"))
    with dest.open_write(TASKS) as handle:
        handle.write(json.dumps(tasks, indent=1, ensure_ascii=False).encode("utf-8"))
    return len(tasks)


def _usable(row: ExportRow, skipped: Counter) -> bool:
    if row.status != "ok" or not row.image_id:
        skipped["status " + row.status] += 1
        return False
    return True
