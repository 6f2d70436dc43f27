"""The human labels of an output's images: one small JSON file beside the output, never inside its rows.

Where: beside the Parquet (``captions.parquet`` -> ``captions.labels.json``,
a part-file folder -> ``DIR/_captioner_labels.json``; OutputStore names it),
for ``--index`` beside the one output the index was built from; ``--labels
FILE`` anywhere else. Readers of the output ignore it (not a part file).

What: one entry per image, keyed by ``image_id`` (the content hash, so a
moved file keeps its labels), with the uri it had, the reviewed caption and
answers, and where the labels came from (task, annotation, annotator,
time). An import replaces the entries of the images it reviews and keeps
every other one: a re-import updates, never duplicates. The whole file is
written through pipeline.storage.Folder (a temporary name renamed into
place; one PUT on a bucket), so a crash leaves the old file or the new one.

The file is versioned (``version``); a newer version than this captioner
reads is refused rather than half-understood and rewritten.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone

from pipeline.labels.label_studio import Review
from pipeline.storage import Folder, StorageError

KIND = "captioner-labels"
VERSION = 1


class LabelsError(ValueError):
    """The labels file cannot be found, read or written as asked; the message says what to do."""


def labels_location(*, sources: tuple[str, ...], labels: str | None, storage_options=None) -> str:
    """Where the labels of an output live: ``labels`` when given, else beside the single output in ``sources``."""
    from pipeline.output import OutputStore

    if labels:
        return labels
    if len(sources) != 1:
        raise LabelsError(
            f"the index was built from {len(sources)} outputs ({', '.join(sources[:3])}), so there is no one place "
            f"beside the output for the labels; pass --labels FILE.json"
        )
    store = OutputStore(sources[0], storage_options)
    return store.root.join(store.labels_rel)


def place_of(location: str, storage_options) -> tuple[Folder, str]:
    """The folder holding ``location`` and the file's name in it (pipeline.storage's split of a location)."""
    from pipeline.storage import name_of, parent_of

    return Folder(parent_of(location) or ".", storage_options), name_of(location)


def read_labels(location: str, storage_options=None) -> dict[str, dict]:
    """image_id -> entry; empty when there is no labels file yet."""
    try:
        folder, name = place_of(location, storage_options)
        if not folder.exists(name):
            return {}
        document = json.loads(folder.read_bytes(name))
    except StorageError as exc:
        raise LabelsError(str(exc)) from exc
    except ValueError as exc:
        raise LabelsError(f"{location} is not a captioner labels file ({exc}); move it away or pass another --labels") from exc
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise LabelsError(f"{location} is not a captioner labels file; move it away or pass another --labels")
    if document.get("version") != VERSION:
        raise LabelsError(f"{location} is labels file version {document.get('version')!r}; this captioner reads version {VERSION}: upgrade captioner")
    return {entry["image_id"]: entry for entry in document.get("labels", [])}


def merge(existing: dict[str, dict], reviews: list[Review], *, source: str) -> tuple[dict[str, dict], int, int]:
    """(labels, added, updated): each reviewed image's entry replaced by its new review, every other kept."""
    merged = dict(existing)
    added = updated = 0
    for review in reviews:
        entry = {**asdict(review), "source": source}
        if review.image_id in merged:
            updated += merged[review.image_id] != entry
        else:
            added += 1
        merged[review.image_id] = entry
    return merged, added, updated


def write_labels(location: str, labels: dict[str, dict], storage_options=None) -> None:
    """Write the whole labels file atomically (Folder.write)."""
    document = {
        "kind": KIND,
        "version": VERSION,
        "about": "human labels of this output's images, keyed by image_id; the model's rows are not changed",
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "labels": [labels[key] for key in sorted(labels)],
    }
    try:
        folder, name = place_of(location, storage_options)
        folder.write(name, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    except StorageError as exc:
        raise LabelsError(str(exc)) from exc
