"""Schema v4: v3 plus a third ``status``, ``gone``: the file is no longer in the source.

Changes from v3 (schemas/v3.py, whose table this one is derived from):
  * status  'ok', 'error' or 'gone'. A run that lists its source and no longer
            finds a file it has a row for writes a ``gone`` row for that uri: a
            copy of the file's last row (its caption, probes, embedding,
            image_id; error_kind and error stay those of that row, null when it
            was ok) with status 'gone' and a new processed_at. Being the newest
            row, it makes the uri gone for every reader (pipeline.rows); a later
            row (the file came back) makes it live again. The copy lets a file
            renamed or restored with the same bytes reuse the row.
No column or probe field is added; the bump is there because a v3 reader
knows only 'ok' and 'error' and would take a gone row for an image that
failed. A v3 file read through ``schemas.upgrade_table`` is unchanged but
for its version.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.v3 import V3

SCHEMA_VERSION = 4

NEW_PROBE_FIELDS: tuple[pa.Field, ...] = ()
NEW_COLUMNS: dict = {}

V4 = V3.changed(
    SCHEMA_VERSION,
    probe_fields=NEW_PROBE_FIELDS,
    columns_after=NEW_COLUMNS,
    docs={
        "schema_version": "schema version the row was written under: 4 (1, 2 or 3 in rows upgraded from older files)",
        "status": "'ok', 'error', or 'gone' (the file left the source: a copy of its last row that readers skip)",
    },
)

SCHEMA = V4  # what schemas.upgrade reads
PROBE_TYPE = V4.probe_type
COLUMN_NAMES = V4.column_names
output_schema = V4.output_schema
describe = V4.describe
