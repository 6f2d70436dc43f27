"""Build tests/golden/v4.parquet: a frozen file of captioner schema v4. Run once; never rerun.

The file stands for what `captioner run` writes under schema v4: v3's columns,
and a third status, ``gone``: /photos/old-name.png left the source (renamed
to /photos/lighthouse.png, whose row is a copy of it), so its row is a copy
of its last one with status 'gone'. Readers must keep accepting it whatever
the schema becomes later: tests/test_golden.py reads it and pins its sha256.
Self-contained on purpose (pyarrow only, the v4 column list spelled out) so
that it records v4 as it was, not as schemas/ says today. It shares the
other golden files' embedder, so all of them can be indexed together.

    python tests/golden/build_v4.py   # only to create the file the first time
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
    "probe_set_hash": "7" * 64,
    "probes": QUESTIONS,
    "schema_version": 4,
}


def _row(n, uri, caption, cut, dog, text, sky, vector, *, image=None, status="ok", minute=0):
    # dog/text: (answer, P(yes)); sky: (answer, answer truncated).
    return {
        "schema_version": 4, "image_id": f"{300 + (image or n):064x}", "uri": uri, "bytes": 4000 + (image or n),
        "source_mtime": datetime(2026, 1, 10, 7, 15, n, 125000 * n, tzinfo=timezone.utc),
        "format": "PNG",
        "width": 1024, "height": 768, "status": status, "error_kind": None, "error": None,
        "caption": caption, "caption_truncated": cut,
        "probes": [
            {"question": QUESTIONS[0], "answer": dog[0], "answer_bool": dog[0] == "yes", "yes_prob": dog[1], "truncated": False},
            {"question": QUESTIONS[1], "answer": text[0], "answer_bool": text[0] == "yes", "yes_prob": text[1], "truncated": False},
            {"question": QUESTIONS[2], "answer": sky[0], "answer_bool": None, "yes_prob": None, "truncated": sky[1]},
        ],
        "embedding": vector, "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"],
        "processed_at": datetime(2026, 6, 1, 12, minute, n, tzinfo=timezone.utc),
    }


LIGHTHOUSE = ("A lighthouse on a rocky headland at dusk.", False, ("no", 0.0625), ("no", 0.125), ("orange", False),
              [0.0, 0.6, 0.0, 0.8])
ROWS = [
    _row(1, "/photos/lighthouse.png", *LIGHTHOUSE, minute=30),  # the renamed file: a copy of old-name.png's row
    _row(2, "/photos/market.png", "Fruit stalls at a busy street market.", False,
         ("yes", 0.75), ("yes", 0.875), ("blue", False), [1.0, 0.0, 0.0, 0.0]),
    _row(3, "/photos/cyclist.png", "A cyclist riding along a canal path.", False,
         ("no", 0.03125), ("no", 0.0625), ("white", False), [0.0, 0.0, 0.6, 0.8]),
    _row(4, "/photos/snowfield.png", "A wide snowfield with a line of fence posts running towards", True,
         ("no", 0.015625), ("no", 0.015625), ("pale grey, with low cloud over the far ridge and the", True),
         [0.6, 0.0, 0.8, 0.0]),
    {
        **{name: None for name, _, _ in COLUMNS},
        "schema_version": 4, "image_id": f"{305:064x}", "uri": "/photos/scan.png", "bytes": 90,
        "source_mtime": datetime(2026, 1, 10, 7, 15, 5, tzinfo=timezone.utc),
        "status": "error", "error_kind": "not_image", "error": "the bytes are an HTML page, not an image",
        "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 6, 1, 12, 0, 5, tzinfo=timezone.utc),
    },
    # Gone: the last row of old-name.png (the same bytes as lighthouse.png now), status 'gone', error_kind null.
    _row(6, "/photos/old-name.png", *LIGHTHOUSE, image=1, status="gone", minute=30),
]


def main() -> None:
    metadata = {f"captioner.{key}".encode(): json.dumps(value).encode() for key, value in RUN.items()}
    schema = pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable in COLUMNS], metadata=metadata)
    table = pa.Table.from_pylist(ROWS, schema=schema)
    pq.write_table(table, Path(__file__).with_name("v4.parquet"))


if __name__ == "__main__":
    main()
