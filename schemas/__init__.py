"""The Parquet contract between the captioning job and every reader.

Writers build their Arrow schema with :func:`output_schema` (the current
version, v5). Readers call :func:`check_schema` before trusting a file (it
accepts every version this captioner reads: v1 to v5) and normalise what they
read with :func:`upgrade_table` (Arrow) or :func:`upgrade_sql` (DuckDB). Bump
``SCHEMA_VERSION`` (and add a module derived from the previous one) for any
change an older reader could misread; keep the old module as its frozen
definition and its golden file under tests/golden/.
"""

from schemas import v1, v2, v3, v4, v5
from schemas.base import (
    META_PREFIX,
    STATUS_ERROR,
    STATUS_GONE,
    STATUS_OK,
    RunMetadata,
    SchemaMismatch,
    read_metadata,
)
from schemas.upgrade import readable, upgrade_schema, upgrade_sql, upgrade_table

SCHEMA_VERSION = v5.SCHEMA_VERSION
PROBE_TYPE = v5.PROBE_TYPE
COLUMN_NAMES = v5.COLUMN_NAMES
output_schema = v5.output_schema
describe = v5.describe

# Every version a reader accepts.
VERSIONS = {v1.SCHEMA_VERSION: v1.V1, v2.SCHEMA_VERSION: v2.V2, v3.SCHEMA_VERSION: v3.V3, v4.SCHEMA_VERSION: v4.V4,
            v5.SCHEMA_VERSION: v5.V5}


def check_schema(schema, *, where: str = "file") -> RunMetadata:
    """Raise SchemaMismatch unless ``schema`` is a captioner schema of a readable version.

    Returns the file's run metadata; its ``schema_version`` says which
    version (upgrade the rows with :func:`upgrade_table` before mixing them).
    """
    run = read_metadata(schema)
    if run is None:
        raise SchemaMismatch(f"{where} has no captioner metadata; it was not written by captioner")
    version = VERSIONS.get(run.schema_version)
    if version is None:
        raise SchemaMismatch(f"{where} uses schema version {run.schema_version}; this captioner reads {readable()}")
    return version.check(schema, run, where)


__all__ = [
    "COLUMN_NAMES",
    "META_PREFIX",
    "PROBE_TYPE",
    "SCHEMA_VERSION",
    "STATUS_ERROR",
    "STATUS_GONE",
    "STATUS_OK",
    "VERSIONS",
    "RunMetadata",
    "SchemaMismatch",
    "check_schema",
    "describe",
    "output_schema",
    "read_metadata",
    "upgrade_schema",
    "upgrade_sql",
    "upgrade_table",
]
