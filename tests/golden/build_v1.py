"""Build tests/golden/v1.parquet: a frozen file of captioner schema v1. Run once; never rerun.

The file stands for what `captioner run` wrote under schema v1. Readers
(check_schema, resume, the merge, the index) must keep accepting it, whatever
the schema becomes later: tests/test_golden.py reads it and pins its sha256.
This script is self-contained on purpose (pyarrow only, the v1 column list
spelled out) so that it records v1 as it was, not as schemas/ says today.

    python tests/golden/build_v1.py   # only to create the file the first time
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DIM = 4
PROBE = pa.struct(
    [pa.field("question", pa.string(), nullable=False), pa.field("answer", pa.string()), pa.field("answer_bool", pa.bool_())]
)
COLUMNS = [
    ("schema_version", pa.int16(), False),
    ("image_id", pa.string(), True),
    ("uri", pa.string(), False),
    ("bytes", pa.int64(), True),
    ("format", pa.string(), True),
    ("width", pa.int32(), True),
    ("height", pa.int32(), True),
    ("status", pa.string(), False),
    ("error_kind", pa.string(), True),
    ("error", pa.string(), True),
    ("caption", pa.string(), True),
    ("probes", pa.list_(PROBE), True),
    ("embedding", pa.list_(pa.float32(), DIM), True),
    ("caption_model", pa.string(), True),
    ("caption_revision", pa.string(), True),
    ("embed_model", pa.string(), True),
    ("embed_revision", pa.string(), True),
    ("probe_set_hash", pa.string(), False),
    ("processed_at", pa.timestamp("us", tz="UTC"), False),
]
QUESTIONS = ["Is there a dog?", "What colour is the sky?"]
RUN = {
    "caption_model": "moondream2",
    "caption_revision": "2025-06-21",
    "embed_model": "open_clip:ViT-B-32",
    "embed_revision": "laion2b_s34b_b79k",
    "embedding_dim": DIM,
    "probe_set_hash": "5" * 64,
    "probes": QUESTIONS,
    "schema_version": 1,
}


def _row(n, uri, caption, dog, sky, vector):
    return {
        "schema_version": 1, "image_id": f"{n:064x}", "uri": uri, "bytes": 1000 + n, "format": "JPEG",
        "width": 640, "height": 480, "status": "ok", "error_kind": None, "error": None, "caption": caption,
        "probes": [
            {"question": QUESTIONS[0], "answer": "yes" if dog else "no", "answer_bool": dog},
            {"question": QUESTIONS[1], "answer": sky, "answer_bool": None},
        ],
        "embedding": vector, "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 1, 1, 12, 0, n, tzinfo=timezone.utc),
    }


ROWS = [
    _row(1, "/photos/beach.jpg", "A dog runs along a sandy beach.", True, "blue", [0.5, 0.5, 0.5, 0.5]),
    _row(2, "/photos/city.jpg", "A busy city street at night.", False, "black", [1.0, 0.0, 0.0, 0.0]),
    _row(3, "/photos/forest.jpg", "Tall pine trees in a misty forest.", False, "grey", [0.0, 1.0, 0.0, 0.0]),
    _row(4, "/photos/kitchen.jpg", "A kitchen with a red kettle.", False, "unknown", [0.0, 0.0, 1.0, 0.0]),
    {
        **{name: None for name, _, _ in COLUMNS},
        "schema_version": 1, "image_id": f"{5:064x}", "uri": "/photos/notes.jpg", "bytes": 26,
        "status": "error", "error_kind": "not_image", "error": "looks like plain text, not an image",
        "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 1, 1, 12, 0, 5, tzinfo=timezone.utc),
    },
]


def main() -> None:
    metadata = {f"captioner.{key}".encode(): json.dumps(value).encode() for key, value in RUN.items()}
    schema = pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable in COLUMNS], metadata=metadata)
    table = pa.Table.from_pylist(ROWS, schema=schema)
    pq.write_table(table, Path(__file__).with_name("v1.parquet"))


if __name__ == "__main__":
    main()
