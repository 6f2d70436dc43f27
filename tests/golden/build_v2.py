"""Build tests/golden/v2.parquet: a frozen file of captioner schema v2. Run once; never rerun.

The file stands for what `captioner run` writes under schema v2: v1's columns
plus ``caption_truncated`` (after ``caption``) and, in each probe, ``yes_prob``
(P("yes") at the answer's first step, yes/no questions only) and
``truncated``. Readers must keep accepting it whatever the schema becomes
later: tests/test_golden.py reads it and pins its sha256. Self-contained on
purpose (pyarrow only, the v2 column list spelled out) so that it records v2
as it was, not as schemas/ says today. It shares v1.parquet's embedder, so
the two can be indexed together.

    python tests/golden/build_v2.py   # only to create the file the first time
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
    "schema_version": 2,
}


def _row(n, uri, caption, cut, dog, text, sky, vector):
    # dog/text: (answer, P(yes)); sky: (answer, answer truncated).
    return {
        "schema_version": 2, "image_id": f"{100 + n:064x}", "uri": uri, "bytes": 2000 + n, "format": "PNG",
        "width": 800, "height": 600, "status": "ok", "error_kind": None, "error": None,
        "caption": caption, "caption_truncated": cut,
        "probes": [
            {"question": QUESTIONS[0], "answer": dog[0], "answer_bool": dog[0] == "yes", "yes_prob": dog[1], "truncated": False},
            {"question": QUESTIONS[1], "answer": text[0], "answer_bool": text[0] == "yes", "yes_prob": text[1], "truncated": False},
            {"question": QUESTIONS[2], "answer": sky[0], "answer_bool": None, "yes_prob": None, "truncated": sky[1]},
        ],
        "embedding": vector, "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 2, 1, 12, 0, n, tzinfo=timezone.utc),
    }


ROWS = [
    _row(1, "/photos/shopfront.png", "A bakery shopfront with a painted sign.", False,
         ("no", 0.0625), ("yes", 0.9375), ("blue", False), [0.0, 0.0, 0.0, 1.0]),
    _row(2, "/photos/park.png", "A dog chasing a ball across a park.", False,
         ("yes", 0.875), ("no", 0.125), ("blue", False), [0.5, 0.5, 0.5, 0.5]),
    _row(3, "/photos/poster.png", "A concert poster on a brick wall, listing bands, dates and a", True,
         ("no", 0.25), ("yes", 0.75), ("there is no sky visible in this picture because the poster covers", True),
         [0.0, 0.6, 0.8, 0.0]),
    _row(4, "/photos/lake.png", "A calm lake at sunrise.", False,
         ("no", 0.03125), ("no", 0.0625), ("orange", False), [0.6, 0.0, 0.8, 0.0]),
    {
        **{name: None for name, _, _ in COLUMNS},
        "schema_version": 2, "image_id": f"{105:064x}", "uri": "/photos/cut.png", "bytes": 120,
        "status": "error", "error_kind": "truncated", "error": "image file is truncated",
        "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 2, 1, 12, 0, 5, tzinfo=timezone.utc),
    },
]


def main() -> None:
    metadata = {f"captioner.{key}".encode(): json.dumps(value).encode() for key, value in RUN.items()}
    schema = pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable in COLUMNS], metadata=metadata)
    table = pa.Table.from_pylist(ROWS, schema=schema)
    pq.write_table(table, Path(__file__).with_name("v2.parquet"))


if __name__ == "__main__":
    main()
