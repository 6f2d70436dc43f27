"""What every schema version shares: run metadata, the column-table machinery, the check.

A version is a :class:`SchemaVersion`: its number, its probe struct and its
column table (name, type, nullable, doc). v1 spells its table out; later
versions are derived from the previous one with :meth:`SchemaVersion.changed`,
so a column's definition lives in exactly one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"
# Schema v4: the file left the source (schemas/v4.py); the row is a copy of its last one.
STATUS_GONE = "gone"
META_PREFIX = "captioner."
# The column whose type depends on the embedder's width (see embedding_type).
EMBEDDING = "embedding"


class SchemaMismatch(ValueError):
    """A file does not conform to the schema this reader understands."""


@dataclass(frozen=True)
class RunMetadata:
    """Facts about the run that produced a file, stored in its key/value metadata.

    ``schema_version`` is the version of the file it was read from; when left
    out it is the version writers use today (``schemas.SCHEMA_VERSION``), and
    ``output_schema`` always stamps the version it builds.
    """

    caption_model: str | None
    caption_revision: str | None
    embed_model: str | None
    embed_revision: str | None
    embedding_dim: int | None
    probe_set_hash: str
    probes: tuple[str, ...] = ()
    schema_version: int = field(default=None)  # type: ignore[assignment]
    # Schema v5: the OCR engine and its weights; None when OCR was off (and in older files).
    ocr_model: str | None = None
    ocr_revision: str | None = None

    def __post_init__(self):
        if self.schema_version is None:
            from schemas import SCHEMA_VERSION  # the writer's version, decided in schemas/__init__.py

            object.__setattr__(self, "schema_version", SCHEMA_VERSION)

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
        """What must match for a row to count as already done on a rerun.

        OCR is not part of it: a rerun that turns OCR on redoes the rows read without it
        (pipeline/output/resume.py) instead of refusing the output.
        """
        return (self.caption_model, self.caption_revision, self.embed_model, self.embed_revision, self.probe_set_hash)


def read_metadata(schema: pa.Schema) -> RunMetadata | None:
    return RunMetadata.from_arrow_metadata(schema.metadata)


def embedding_type(dim: int | None) -> pa.DataType:
    # Without an embedder there is no width to fix; keep a plain list so the
    # column still exists (all null) and readers need no special case.
    return pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())


Column = tuple  # (name, arrow type or None for the embedding, nullable, doc)


@dataclass(frozen=True)
class SchemaVersion:
    """One version of the Parquet contract."""

    version: int
    probe_type: pa.StructType
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> list[str]:
        return [name for name, *_ in self.columns]

    def changed(
        self,
        version: int,
        *,
        probe_fields: tuple[pa.Field, ...] = (),
        columns_after: dict[str, tuple[Column, ...]] | None = None,
        docs: dict[str, str] | None = None,
    ) -> "SchemaVersion":
        """The next version: probe struct fields appended, columns inserted after named ones, docs replaced."""
        probe = pa.struct(list(self.probe_type) + list(probe_fields))
        columns = []
        for name, typ, nullable, doc in self.columns:
            if name == "probes":
                typ = pa.list_(probe)
            columns.append((name, typ, nullable, (docs or {}).get(name, doc)))
            columns.extend((columns_after or {}).get(name, ()))
        return SchemaVersion(version, probe, tuple(columns))

    def output_schema(self, embedding_dim: int | None, run: RunMetadata | None = None) -> pa.Schema:
        fields = []
        for name, typ, nullable, doc in self.columns:
            if name == EMBEDDING:
                typ = embedding_type(embedding_dim)
            fields.append(pa.field(name, typ, nullable=nullable, metadata={b"doc": doc.encode()}))
        metadata = replace(run, schema_version=self.version).to_arrow_metadata() if run else None
        return pa.schema(fields, metadata=metadata)

    def check(self, schema: pa.Schema, run: RunMetadata, where: str) -> RunMetadata:
        """Raise SchemaMismatch unless ``schema`` has exactly this version's columns and types."""
        expected = self.output_schema(run.embedding_dim)
        if schema.names != expected.names:
            raise SchemaMismatch(f"{where} has columns {schema.names}; schema v{self.version} expects {expected.names}")
        for f in expected:
            actual = schema.field(f.name)
            if not actual.type.equals(f.type):
                raise SchemaMismatch(
                    f"{where}: column {f.name!r} is {actual.type}, schema v{self.version} expects {f.type}"
                )
        return run

    def describe(self, embedding_dim: int | None = None) -> str:
        """A human-readable table of the schema, for ``captioner schema``."""
        schema = self.output_schema(embedding_dim)
        width = max(len(n) for n in self.column_names)
        lines = [f"captioner Parquet schema v{self.version} (one row per input image)", ""]
        for f in schema:
            doc = f.metadata[b"doc"].decode()
            null = "" if f.nullable else " not null"
            lines.append(f"  {f.name:<{width}}  {str(f.type) + null}")
            lines.append(f"  {'':<{width}}    {doc}")
        lines += ["", "File metadata keys: " + ", ".join(META_PREFIX + k for k in RunMetadata.__dataclass_fields__)]
        return "\n".join(lines)
