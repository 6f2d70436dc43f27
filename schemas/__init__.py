"""The Parquet contract between the captioning job and every reader.

Writers build their Arrow schema with :func:`output_schema`; readers call
:func:`check_schema` before trusting a file. Bump ``SCHEMA_VERSION`` (and add a
new module) for any change a v1 reader could misread.
"""

from schemas.v1 import (
    SCHEMA_VERSION,
    STATUS_ERROR,
    STATUS_OK,
    META_PREFIX,
    PROBE_TYPE,
    RunMetadata,
    SchemaMismatch,
    check_schema,
    describe,
    output_schema,
    read_metadata,
)

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_ERROR",
    "STATUS_OK",
    "META_PREFIX",
    "PROBE_TYPE",
    "RunMetadata",
    "SchemaMismatch",
    "check_schema",
    "describe",
    "output_schema",
    "read_metadata",
]
