"""``captioner export hf-dataset``: a Hugging Face ``datasets.Dataset`` saved with save_to_disk.

Columns: ``image`` (datasets.Image, the original file's bytes), ``file_name``
(the path below the root), ``caption``, ``caption_short`` and ``image_text``
(schema v5: the short caption and the text OCR read in the image, null when
not written), ``image_id``, one column per probe question
(pipeline.export.labels), and with --trigger/--style tags a ``text`` column
(pipeline.export.training_text). ``datasets.load_from_disk(OUT)``
reads it back. The dataset is built in a temporary cache folder (never the
user's HF cache) and written to OUT, local or on a bucket.
"""

from __future__ import annotations

import tempfile
from collections import Counter

from pipeline.export.errors import optional_import
from pipeline.export.images import image_bytes, image_rows, nothing_to_export
from pipeline.export.labels import feature_types, probe_columns, probe_values
from pipeline.export.rows import RowSource
from pipeline.export.storage import ExportFolder, relative_paths
from pipeline.export.training_text import TrainingText

SAVED = ("dataset_info.json", "state.json")  # beside the data-*-of-*.arrow shards state.json names


def write_hf_dataset(source: RowSource, dest: ExportFolder, *, root: str | None, skipped: Counter,
                     text: TrainingText | None = None) -> int:
    storage = dest.storage
    datasets = optional_import("datasets", "captioner export hf-dataset")
    # save_to_disk writes these names into the folder (and deletes nothing): refuse a user's own first
    dest.prepare([*SAVED, *dest.folder.list("data-*-of-*.arrow")])
    for rel in SAVED:
        dest.check_replace(rel)
    relative = relative_paths(source.uris(), root, tree=source.tree_uris())
    columns = probe_columns(source.questions)
    with_text = text is not None and not text.plain  # --trigger / --style tags: a `text` column
    types = {"bool": datasets.Value("bool"), "string": datasets.Value("string"), "float": datasets.Value("float32")}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "file_name": datasets.Value("string"),
            "caption": datasets.Value("string"),
            # Schema v5: the short caption (two lengths asked) and the text OCR read in the image; null when not written.
            "caption_short": datasets.Value("string"),
            "image_text": datasets.Value("string"),
            "image_id": datasets.Value("string"),
            **({"text": datasets.Value("string")} if with_text else {}),
            **{name: types[kind] for name, kind in feature_types(columns, source.has_yes_prob).items()},
        }
    )
    counted = Counter()

    def records():
        for row in image_rows(source.rows(), skipped):
            data = image_bytes(storage, row.uri, skipped)
            if data is None:
                continue
            counted["rows"] += 1
            rel = relative[row.uri]
            yield {
                "image": {"bytes": data, "path": rel},
                "file_name": rel,
                "caption": row.caption,
                "caption_short": row.caption_short,
                "image_text": row.text,
                "image_id": row.image_id,
                **({"text": text.of(row)} if with_text else {}),
                **probe_values(row, columns, source.has_yes_prob),
            }

    with tempfile.TemporaryDirectory(prefix="captioner-hf-") as cache:
        # The fingerprint names the cache entry; the generator (which holds a
        # database connection) cannot be hashed, and the cache is thrown away.
        try:
            dataset = datasets.Dataset.from_generator(records, features=features, cache_dir=cache, fingerprint="captioner-export")
        except ValueError:
            if counted["rows"] == 0:  # datasets refuses an empty split
                raise nothing_to_export(skipped) from None
            raise
        if counted["rows"] == 0:
            raise nothing_to_export(skipped)
        dataset.save_to_disk(dest.out, storage_options=storage.options)
        dest.saved([*SAVED, *_data_files(dest)])
        del dataset
    return counted["rows"]


def _data_files(dest: ExportFolder) -> list[str]:
    """The shards the saved dataset's state.json names (none when it was not written)."""
    import json

    try:
        state = json.loads(dest.folder.read_bytes("state.json"))
        return [str(f["filename"]) for f in state.get("_data_files", [])]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []
