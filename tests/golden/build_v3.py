"""Build tests/golden/v3.parquet: a frozen file of captioner schema v3. Run once; never rerun.

The file stands for what `captioner run` writes under schema v3: v2's columns
plus ``source_mtime`` (after ``bytes``): the source file's modification time
as listed, null when the listing had none (one row here has none). Readers
must keep accepting it whatever the schema becomes later:
tests/test_golden.py reads it and pins its sha256. Self-contained on purpose
(pyarrow only, the v3 column list spelled out) so that it records v3 as it
was, not as schemas/ says today. It shares v1.parquet's and v2.parquet's
embedder, so the three can be indexed together.

    python tests/golden/build_v3.py   # only to create the file the first time
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DIM = 4
PROBE = pa.struct(
    [
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("answer_bool", pa.bool_()),
        pa.field("yes_prob", pa.float32()),
        pa.field("truncated", pa.bool_()),
    ]
)
COLUMNS = [
    ("schema_version", pa.int16(), False),
    ("image_id", pa.string(), True),
    ("uri", pa.string(), False),
    ("bytes", pa.int64(), True),
    ("source_mtime", pa.timestamp("us", tz="UTC"), True),
    ("format", pa.string(), True),
    ("width", pa.int32(), True),
    ("height", pa.int32(), True),
    ("status", pa.string(), False),
    ("error_kind", pa.string(), True),
    ("error", pa.string(), True),
    ("caption", pa.string(), True),
    ("caption_truncated", pa.bool_(), True),
    ("probes", pa.list_(PROBE), True),
    ("embedding", pa.list_(pa.float32(), DIM), True),
    ("caption_model", pa.string(), True),
    ("caption_revision", pa.string(), True),
    ("embed_model", pa.string(), True),
    ("embed_revision", pa.string(), True),
    ("probe_set_hash", pa.string(), False),
    ("processed_at", pa.timestamp("us", tz="UTC"), False),
]
QUESTIONS = ["Is there a dog?", "Is there text in the image?", "What colour is the sky?"]
RUN = {
    "caption_model": "moondream2",
    "caption_revision": "2025-06-21",
    "embed_model": "open_clip:ViT-B-32",
    "embed_revision": "laion2b_s34b_b79k",
    "embedding_dim": DIM,
    "probe_set_hash": "6" * 64,
    "probes": QUESTIONS,
    "schema_version": 3,
}


def _row(n, uri, caption, cut, dog, text, sky, vector):
    # dog/text: (answer, P(yes)); sky: (answer, answer truncated).
    return {
        "schema_version": 3, "image_id": f"{200 + n:064x}", "uri": uri, "bytes": 3000 + n,
        "source_mtime": None if n == 4 else datetime(2025, 11, 20, 8, 30, n, 250000 * n, tzinfo=timezone.utc),
        "format": "PNG",
        "width": 800, "height": 600, "status": "ok", "error_kind": None, "error": None,
        "caption": caption, "caption_truncated": cut,
        "probes": [
            {"question": QUESTIONS[0], "answer": dog[0], "answer_bool": dog[0] == "yes", "yes_prob": dog[1], "truncated": False},
            {"question": QUESTIONS[1], "answer": text[0], "answer_bool": text[0] == "yes", "yes_prob": text[1], "truncated": False},
            {"question": QUESTIONS[2], "answer": sky[0], "answer_bool": None, "yes_prob": None, "truncated": sky[1]},
        ],
        "embedding": vector, "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 3, 1, 9, 0, n, tzinfo=timezone.utc),
    }


ROWS = [
    _row(1, "/photos/harbour.png", "Fishing boats moored in a small harbour.", False,
         ("no", 0.125), ("no", 0.25), ("grey", False), [0.0, 0.0, 1.0, 0.0]),
    _row(2, "/photos/terrier.png", "A terrier asleep on a sofa.", False,
         ("yes", 0.96875), ("no", 0.0625), ("not visible", False), [0.5, 0.5, 0.5, 0.5]),
    _row(3, "/photos/menu.png", "A handwritten cafe menu on a chalkboard, listing soups, sandwiches and", True,
         ("no", 0.0625), ("yes", 0.9375), ("there is no sky in this picture, only the chalkboard and the", True),
         [0.8, 0.0, 0.0, 0.6]),
    _row(4, "/photos/desert.png", "Sand dunes under a cloudless sky.", False,
         ("no", 0.015625), ("no", 0.03125), ("blue", False), [0.0, 0.8, 0.0, 0.6]),
    {
        **{name: None for name, _, _ in COLUMNS},
        "schema_version": 3, "image_id": f"{205:064x}", "uri": "/photos/half.png", "bytes": 140,
        "source_mtime": datetime(2025, 11, 20, 8, 30, 5, tzinfo=timezone.utc),
        "status": "error", "error_kind": "truncated", "error": "image file is truncated",
        "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 3, 1, 9, 0, 5, tzinfo=timezone.utc),
    },
]


def main() -> None:
    metadata = {f"captioner.{key}".encode(): json.dumps(value).encode() for key, value in RUN.items()}
    schema = pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable in COLUMNS], metadata=metadata)
    table = pa.Table.from_pylist(ROWS, schema=schema)
    pq.write_table(table, Path(__file__).with_name("v3.parquet"))


if __name__ == "__main__":
    main()
