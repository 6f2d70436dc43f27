"""Schema v1: one row per input image.

Columns are listed in ``_COLUMNS`` with a one-line meaning each; ``captioner
schema`` prints that table. The embedding column is a fixed-size list whose
width is the embedder's dimension, so the schema is a function of that width.
Run-level facts (models, probe set) are repeated per row, so that rows from
different runs can share a dataset, and also stored in the file metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa

SCHEMA_VERSION = 1
STATUS_OK = "ok"
STATUS_ERROR = "error"
META_PREFIX = "captioner."

PROBE_TYPE = pa.struct(
    [
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        # True/False when the question is a yes/no question and the answer
        # reads as yes or no; null otherwise.
        pa.field("answer_bool", pa.bool_()),
    ]
)


def _embedding_type(dim: int | None) -> pa.DataType:
    # Without an embedder there is no width to fix; keep a plain list so the
    # column still exists (all null) and readers need no special case.
    return pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())


_COLUMNS: list[tuple[str, object, bool, str]] = [
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
]

COLUMN_NAMES = [name for name, *_ in _COLUMNS]


class SchemaMismatch(ValueError):
    """A file does not conform to the schema this reader understands."""


@dataclass(frozen=True)
class RunMetadata:
    """Facts about the run that produced a file, stored in its key/value metadata."""

    caption_model: str | None
    caption_revision: str | None
    embed_model: str | None
    embed_revision: str | None
    embedding_dim: int | None
    probe_set_hash: str
    probes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def to_arrow_metadata(self) -> dict[bytes, bytes]:
        out = {}
        for key, value in asdict(self).items():
            out[(META_PREFIX + key).encode()] = json.dumps(value).encode()
        return out

    @classmethod
    def from_arrow_metadata(cls, metadata: dict[bytes, bytes] | None) -> "RunMetadata | None":
        if not metadata:
            return None
        fields = {}
        for key, raw in metadata.items():
            name = key.decode(errors="replace")
            if name.startswith(META_PREFIX):
                fields[name[len(META_PREFIX):]] = json.loads(raw)
        if "schema_version" not in fields:
            return None
        fields["probes"] = tuple(fields.get("probes", ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in fields.items() if k in known})

    def models_signature(self) -> tuple:
        """What must match for a row to count as already done on a rerun."""
        return (self.caption_model, self.caption_revision, self.embed_model, self.embed_revision, self.probe_set_hash)


def output_schema(embedding_dim: int | None, run: RunMetadata | None = None) -> pa.Schema:
    fields = []
    for name, typ, nullable, doc in _COLUMNS:
        if name == "embedding":
            typ = _embedding_type(embedding_dim)
        fields.append(pa.field(name, typ, nullable=nullable, metadata={b"doc": doc.encode()}))
    return pa.schema(fields, metadata=run.to_arrow_metadata() if run else None)


def read_metadata(schema: pa.Schema) -> RunMetadata | None:
    return RunMetadata.from_arrow_metadata(schema.metadata)


def check_schema(schema: pa.Schema, *, where: str = "file") -> RunMetadata:
    """Raise SchemaMismatch unless ``schema`` is a v1 captioner schema; return its run metadata."""
    run = read_metadata(schema)
    if run is None:
        raise SchemaMismatch(f"{where} has no captioner metadata; it was not written by captioner")
    if run.schema_version != SCHEMA_VERSION:
        raise SchemaMismatch(
            f"{where} uses schema version {run.schema_version}; this captioner reads version {SCHEMA_VERSION}"
        )
    expected = output_schema(run.embedding_dim)
    if schema.names != expected.names:
        raise SchemaMismatch(f"{where} has columns {schema.names}; schema v1 expects {expected.names}")
    for field in expected:
        actual = schema.field(field.name)
        if not actual.type.equals(field.type):
            raise SchemaMismatch(f"{where}: column {field.name!r} is {actual.type}, schema v1 expects {field.type}")
    return run


def describe(embedding_dim: int | None = None) -> str:
    """A human-readable table of the schema, for ``captioner schema``."""
    schema = output_schema(embedding_dim)
    width = max(len(n) for n in COLUMN_NAMES)
    lines = [f"captioner Parquet schema v{SCHEMA_VERSION} (one row per input image)", ""]
    for field in schema:
        doc = field.metadata[b"doc"].decode()
        null = "" if field.nullable else " not null"
        lines.append(f"  {field.name:<{width}}  {str(field.type) + null}")
        lines.append(f"  {'':<{width}}    {doc}")
    lines += ["", "File metadata keys: " + ", ".join(META_PREFIX + k for k in RunMetadata.__dataclass_fields__)]
    return "\n".join(lines)
