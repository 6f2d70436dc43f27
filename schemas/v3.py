"""Schema v3: v2 plus the source file's modification time, so a rerun can tell a changed file.

Changes from v2 (schemas/v2.py, whose table this one is derived from):
  * source_mtime  timestamp[us, UTC], right after ``bytes``: the modification
                  time the listing gave for the source file when the row was
                  made; null when the listing had none.
Resume counts a row as done only while the file still lists with the same
size and this same mtime. A v1/v2 file upgraded with ``schemas.upgrade_table``
has it null (unknown), and resume then compares the file's sha256 with
``image_id`` instead.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.v2 import V2

SCHEMA_VERSION = 3

NEW_PROBE_FIELDS: tuple[pa.Field, ...] = ()
# Added columns: name -> the column each follows.
NEW_COLUMNS = {
    "bytes": (
        ("source_mtime", pa.timestamp("us", tz="UTC"), True,
         "the source file's modification time as listed when the row was made; null when the listing had none"),
    ),
}

V3 = V2.changed(
    SCHEMA_VERSION,
    probe_fields=NEW_PROBE_FIELDS,
    columns_after=NEW_COLUMNS,
    docs={"schema_version": "schema version the row was written under: 3 (1 or 2 in rows upgraded from older files)"},
)

SCHEMA = V3  # what schemas.upgrade reads
PROBE_TYPE = V3.probe_type
COLUMN_NAMES = V3.column_names
output_schema = V3.output_schema
describe = V3.describe
