"""Build tests/golden/v5.parquet: a frozen file of captioner schema v5. Run once; never rerun.

The file stands for what `captioner run --ocr --caption-length short,normal`
writes under schema v5: v4's columns plus caption_short, text, text_lines,
ocr_model and ocr_revision. /photos/noticeboard.png is the image whose only
mention of "zanzibar" is the text read in it; /photos/meadow.png was read
and holds no text (''); the error row was never read (null). Readers must
keep accepting it whatever the schema becomes later: tests/test_golden.py
reads it and pins its sha256. Self-contained on purpose (pyarrow only, the
v5 column list spelled out). It shares the other golden files' embedder, so
all of them can be indexed together.

    python tests/golden/build_v5.py   # only to create the file the first time
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
LINE = pa.struct([pa.field("text", pa.string()), pa.field("confidence", pa.float32()),
                  pa.field("box", pa.list_(pa.float32(), 8))])
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
    ("caption_short", pa.string(), True),
    ("probes", pa.list_(PROBE), True),
    ("text", pa.string(), True),
    ("text_lines", pa.list_(LINE), True),
    ("embedding", pa.list_(pa.float32(), DIM), True),
    ("caption_model", pa.string(), True),
    ("caption_revision", pa.string(), True),
    ("embed_model", pa.string(), True),
    ("embed_revision", pa.string(), True),
    ("ocr_model", pa.string(), True),
    ("ocr_revision", pa.string(), True),
    ("probe_set_hash", pa.string(), False),
    ("processed_at", pa.timestamp("us", tz="UTC"), False),
]
QUESTIONS = ["Is there a dog?", "Is there text in the image?", "What colour is the sky?"]
OCR_REVISION = "1.4.4; ch_PP-OCRv4_det_infer.onnx sha256:" + "d" * 64 + "; ch_ppocr_mobile_v2.0_cls_infer.onnx sha256:" \
    + "c" * 64 + "; ch_PP-OCRv4_rec_infer.onnx sha256:" + "e" * 64
RUN = {
    "caption_model": "moondream2",
    "caption_revision": "2025-06-21",
    "embed_model": "open_clip:ViT-B-32",
    "embed_revision": "laion2b_s34b_b79k",
    "embedding_dim": DIM,
    "probe_set_hash": "7" * 64,
    "probes": QUESTIONS,
    "schema_version": 5,
    "ocr_model": "rapidocr-onnxruntime",
    "ocr_revision": OCR_REVISION,
}


def _row(n, uri, caption, short, text, lines, vector, dog=("no", 0.0625)):
    return {
        "schema_version": 5, "image_id": f"{500 + n:064x}", "uri": uri, "bytes": 5000 + n,
        "source_mtime": datetime(2026, 7, 1, 9, 0, n, tzinfo=timezone.utc), "format": "PNG",
        "width": 800, "height": 600, "status": "ok", "error_kind": None, "error": None,
        "caption": caption, "caption_truncated": False, "caption_short": short,
        "probes": [
            {"question": QUESTIONS[0], "answer": dog[0], "answer_bool": dog[0] == "yes", "yes_prob": dog[1], "truncated": False},
            {"question": QUESTIONS[1], "answer": "yes" if text else "no", "answer_bool": bool(text),
             "yes_prob": 0.875 if text else 0.0625, "truncated": False},
            {"question": QUESTIONS[2], "answer": "blue", "answer_bool": None, "yes_prob": None, "truncated": False},
        ],
        "text": text, "text_lines": lines,
        "embedding": vector, "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "ocr_model": RUN["ocr_model"], "ocr_revision": RUN["ocr_revision"],
        "probe_set_hash": RUN["probe_set_hash"],
        "processed_at": datetime(2026, 7, 2, 8, 0, n, tzinfo=timezone.utc),
    }


def _line(text, confidence, x, y, w, h):
    return {"text": text, "confidence": confidence, "box": [x, y, x + w, y, x + w, y + h, x, y + h]}


ROWS = [
    _row(1, "/photos/noticeboard.png",
         "A wooden noticeboard on a village green, with a poster pinned to it beside a bench.",
         "A noticeboard on a village green.", "ZANZIBAR NIGHT\nSaturday 8 pm",
         [_line("ZANZIBAR NIGHT", 0.96875, 120, 80, 300, 40), _line("Saturday 8 pm", 0.9375, 130, 140, 220, 30)],
         [0.0, 0.8, 0.6, 0.0]),
    _row(2, "/photos/meadow.png", "A meadow of wild flowers under a clear sky.", "A flower meadow.", "", [],
         [0.8, 0.0, 0.0, 0.6], dog=("yes", 0.8125)),
    _row(3, "/photos/receipt.png", "A paper receipt lying on a kitchen table.", "A receipt on a table.",
         "CORNER SHOP\nTOTAL 12.40",
         [_line("CORNER SHOP", 0.984375, 40, 30, 200, 30), _line("TOTAL 12.40", 0.953125, 40, 420, 180, 28)],
         [0.0, 0.0, 0.8, 0.6]),
    {
        **{name: None for name, _, _ in COLUMNS},
        "schema_version": 5, "image_id": f"{504:064x}", "uri": "/photos/notes.png", "bytes": 70,
        "source_mtime": datetime(2026, 7, 1, 9, 0, 4, tzinfo=timezone.utc),
        "status": "error", "error_kind": "not_image", "error": "the bytes are text, not an image",
        "caption_model": RUN["caption_model"], "caption_revision": RUN["caption_revision"],
        "embed_model": RUN["embed_model"], "embed_revision": RUN["embed_revision"],
        "ocr_model": RUN["ocr_model"], "ocr_revision": RUN["ocr_revision"],
        "probe_set_hash": RUN["probe_set_hash"], "processed_at": datetime(2026, 7, 2, 8, 0, 4, tzinfo=timezone.utc),
    },
]


def main() -> None:
    metadata = {f"captioner.{key}".encode(): json.dumps(value).encode() for key, value in RUN.items()}
    schema = pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable in COLUMNS], metadata=metadata)
    table = pa.Table.from_pylist(ROWS, schema=schema)
    pq.write_table(table, Path(__file__).with_name("v5.parquet"))


if __name__ == "__main__":
    main()
