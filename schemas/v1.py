"""Schema v1: one row per input image. Frozen: files written under it stay readable.

Columns are listed in ``V1.columns`` with a one-line meaning each. The
embedding column is a fixed-size list whose width is the embedder's
dimension, so the schema is a function of that width. Run-level facts
(models, probe set) are repeated per row, so that rows from different runs can
share a dataset, and also stored in the file metadata. Later versions derive
their tables from this one (see schemas/v2.py).
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import SchemaVersion

SCHEMA_VERSION = 1

PROBE_TYPE = pa.struct(
    [
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        # True/False when the question is a yes/no question and the answer
        # reads as yes or no; null otherwise.
        pa.field("answer_bool", pa.bool_()),
    ]
)

V1 = SchemaVersion(
    SCHEMA_VERSION,
    PROBE_TYPE,
    (
        ("schema_version", pa.int16(), False, "always 1 for this schema"),
        ("image_id", pa.string(), True, "sha256 hex of the file's bytes; null when the bytes could not be read"),
        ("uri", pa.string(), False, "where the image was read from (absolute path or fsspec URL)"),
        ("bytes", pa.int64(), True, "file size in bytes"),
        ("format", pa.string(), True, "image format as decoded (JPEG, PNG, ...)"),
        ("width", pa.int32(), True, "width in pixels after EXIF orientation"),
        ("height", pa.int32(), True, "height in pixels after EXIF orientation"),
        ("status", pa.string(), False, "'ok' or 'error'"),
        ("error_kind", pa.string(), True, "short machine-readable error class (unreadable, not_image, truncated, too_large, model, ...)"),
        ("error", pa.string(), True, "human-readable error message; null when status is ok"),
        ("caption", pa.string(), True, "the caption, null when captioning is off or failed"),
        ("probes", pa.list_(PROBE_TYPE), True, "one entry per probe question, in probe-set order"),
        ("embedding", None, True, "L2-normalised float32 image embedding"),
        ("caption_model", pa.string(), True, "captioning backend id, null when captioning is off"),
        ("caption_revision", pa.string(), True, "model revision (hub commit/tag, or 'local')"),
        ("embed_model", pa.string(), True, "embedding backend id, null when embedding is off"),
        ("embed_revision", pa.string(), True, "embedding weights tag or checkpoint"),
        ("probe_set_hash", pa.string(), False, "sha256 of the probe questions, in order"),
        ("processed_at", pa.timestamp("us", tz="UTC"), False, "when the row was produced"),
    ),
)

COLUMN_NAMES = V1.column_names
output_schema = V1.output_schema
describe = V1.describe
