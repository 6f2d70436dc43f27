"""The one Parquet row factory of the tests: rows of the current schema, built through ``schemas.output_schema``.

``row(uri, run=..., **fields)`` is one row as a dict with every column of the
current schema: the run's identity columns from ``run``, an ok status, and
null for everything not given. ``table(rows, run)`` builds the Arrow table
with the run's schema (a key that is no column is an error, so a renamed
column cannot be silently dropped); ``write(path, rows, run)`` writes it as a
captioner part file would be. A new schema column needs no change here: it
is null unless a test sets it.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION, STATUS_OK, RunMetadata, output_schema

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(uri: str, *, run: RunMetadata, at: datetime = T0, **fields) -> dict:
    """One current-schema row for ``uri`` made by ``run`` at ``at``; ``fields`` override any column."""
    out = {name: None for name in output_schema(run.embedding_dim).names}
    out.update(
        schema_version=SCHEMA_VERSION,
        uri=uri,
        status=STATUS_OK,
        caption_model=run.caption_model,
        caption_revision=run.caption_revision,
        embed_model=run.embed_model,
        embed_revision=run.embed_revision,
        ocr_model=run.ocr_model,
        ocr_revision=run.ocr_revision,
        probe_set_hash=run.probe_set_hash,
        processed_at=at,
    )
    unknown = set(fields) - set(out)
    if unknown:
        raise KeyError(f"not columns of schema v{SCHEMA_VERSION}: {sorted(unknown)}")
    out.update(fields)
    return out


def table(rows: list[dict], run: RunMetadata) -> pa.Table:
    """``rows`` (dicts keyed by column) as a table of ``run``'s output schema, metadata included."""
    schema = output_schema(run.embedding_dim, run)
    unknown = {key for r in rows for key in r} - set(schema.names)
    if unknown:
        raise KeyError(f"not columns of schema v{SCHEMA_VERSION}: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)


def write(path, rows: list[dict], run: RunMetadata) -> pa.Table:
    """Write ``rows`` to the Parquet file ``path``; returns the table written."""
    written = table(rows, run)
    pq.write_table(written, path)
    return written
