"""Turning rows of an older schema version into rows of the current one.

Every reader that meets files of several versions normalises them here:
``upgrade_table`` for Arrow tables (the merge, exports, the web page), and
``upgrade_sql`` for DuckDB queries over Parquet (the search index). Columns
and probe fields a version added are null in upgraded rows: unknown, never a
made-up value.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import SchemaMismatch, read_metadata
from schemas import v2, v3, v4, v5

_CURRENT = v5.SCHEMA
# Version N -> the module of version N+1, which declares what it added to N
# (NEW_PROBE_FIELDS, NEW_COLUMNS) and its table (SCHEMA).
_STEPS = {1: v2, 2: v3, 3: v4, 4: v5}

# DuckDB spellings of the Arrow types an upgrade fills with nulls.
_DUCKDB_TYPES = {
    pa.float32(): "FLOAT",
    pa.bool_(): "BOOLEAN",
    pa.string(): "VARCHAR",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.list_(v5.TEXT_LINE_TYPE): "STRUCT(text VARCHAR, confidence FLOAT, box FLOAT[8])[]",
}


def _version_of(schema: pa.Schema, where: str) -> int:
    run = read_metadata(schema)
    if run is None:
        raise SchemaMismatch(f"{where} has no captioner metadata; it was not written by captioner")
    if run.schema_version != _CURRENT.version and run.schema_version not in _STEPS:
        raise SchemaMismatch(f"{where} uses schema version {run.schema_version}; this captioner reads {readable()}")
    return run.schema_version


def readable() -> str:
    return "versions " + ", ".join(str(v) for v in sorted({*_STEPS, _CURRENT.version}))


def upgrade_table(table: pa.Table) -> pa.Table:
    """``table`` (rows of a captioner file of any readable version, all columns or some) as current-version rows.

    The version is read from the table's captioner metadata (pq.read_table and
    ParquetFile.read_row_group keep it). A current-version table comes back
    unchanged. Otherwise each added probe field is null in every probe entry,
    each added column present-after-its-anchor is inserted as nulls, and the
    metadata says the current version. Raises SchemaMismatch for a table
    without captioner metadata or of a version this captioner cannot read.
    """
    version = _version_of(table.schema, "table")
    while version != _CURRENT.version:
        table = _apply(table, _STEPS[version])
        version = _STEPS[version].SCHEMA_VERSION
    return table


def upgrade_schema(schema: pa.Schema) -> pa.Schema:
    """The schema ``upgrade_table`` gives for a table of ``schema``."""
    return upgrade_table(schema.empty_table()).schema


def _apply(table: pa.Table, step) -> pa.Table:
    target = step.SCHEMA
    run = read_metadata(table.schema)
    fields, arrays = [], []
    for name in table.column_names:
        column = table.column(name)
        field = table.schema.field(name)
        if name == "probes":
            column = pa.chunked_array([_add_probe_fields(chunk, target.probe_type) for chunk in column.chunks],
                                      pa.list_(target.probe_type))
            field = field.with_type(pa.list_(target.probe_type))
        fields.append(_documented(field, target))
        arrays.append(column)
        for added, typ, nullable, _doc in step.NEW_COLUMNS.get(name, ()):
            fields.append(_documented(pa.field(added, typ, nullable=nullable), target))
            arrays.append(pa.nulls(table.num_rows, typ))
    metadata = target.output_schema(run.embedding_dim, run).metadata
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata))


def _documented(field: pa.Field, target) -> pa.Field:
    docs = {name: doc for name, _, _, doc in target.columns}
    return field.with_metadata({b"doc": docs[field.name].encode()}) if field.name in docs else field


def _add_probe_fields(probes: pa.ListArray, probe_type: pa.StructType) -> pa.ListArray:
    # Rebased offsets and just the entries they cover: Arrow cannot combine
    # a sliced offsets buffer with a null mask.
    offsets = probes.offsets.to_numpy()
    start, end = int(offsets[0]), int(offsets[-1])
    entries = probes.values.slice(start, end - start)
    children = entries.flatten()
    children += [pa.nulls(len(entries), f.type) for f in list(probe_type)[len(children):]]
    struct = pa.StructArray.from_arrays(children, fields=list(probe_type), mask=entries.is_null())
    rebased = pa.array(offsets - start, pa.int32())
    return pa.ListArray.from_arrays(rebased, struct, mask=probes.is_null())


def upgrade_sql(version: int) -> dict[str, str]:
    """For a Parquet file of ``version``: current column name -> DuckDB expression over that file's columns.

    Use as ``SELECT <expr> AS <name>, ...`` over ``read_parquet(files of that
    version)``; a column without an entry is read as it is.
    """
    if version == _CURRENT.version:
        return {}
    if version not in _STEPS:
        raise SchemaMismatch(f"schema version {version}; this captioner reads {readable()}")
    # Compose the steps from ``version`` up: every column and probe field they add is null.
    columns, probe_fields = [], []
    while version != _CURRENT.version:
        step = _STEPS[version]
        for added in step.NEW_COLUMNS.values():
            columns.extend(added)
        probe_fields.extend(step.NEW_PROBE_FIELDS)
        version = step.SCHEMA_VERSION
    out = {name: f"CAST(NULL AS {_DUCKDB_TYPES[typ]})" for name, typ, _, _ in columns}
    if probe_fields:
        kept = [f.name for f in _CURRENT.probe_type if f not in probe_fields]
        packed = [f"{name} := p.{name}" for name in kept] + [
            f"{f.name} := CAST(NULL AS {_DUCKDB_TYPES[f.type]})" for f in probe_fields
        ]
        out["probes"] = f"list_transform(probes, lambda p: struct_pack({', '.join(packed)}))"
    return out
