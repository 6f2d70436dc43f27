"""Which row is current for an image: the one rule resume, the merge and the index use.

Rows for one uri can pile up: a rerun retries a failed file, a changed file is
processed again, two outputs of the same folder are indexed together. The
current row is the newest:

  1. the greatest ``processed_at``;
  2. on a tie, the row from the file whose path sorts last (part files are
     named by commit time, and a single-file output ``x.parquet`` sorts before
     its ``x.parquet.parts/``);
  3. on a tie within a file, the later row.

A uri whose current row has status ``gone`` (schema v4: the file left the
source) is gone: readers skip it (:func:`sql_is_live`). A later row, when the
file comes back, is newer and makes it live again; nothing else is needed.

``NEWEST_FIRST`` is that order. :func:`newest_rows` applies it to Arrow key
columns; :func:`sql_is_newest` writes the same order as a DuckDB window
predicate for the index. Both are generated from ``NEWEST_FIRST``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import STATUS_GONE

STATUS = "status"

# Key columns of a row: the image, when it was produced, where it is stored.
URI = "uri"
PROCESSED_AT = "processed_at"
FILE = "file"  # the rank, in path order, of the file holding the row (see rank_files)
ROW = "row"  # the row's position in that file

# Newest first, within one uri.
NEWEST_FIRST: tuple[str, ...] = (PROCESSED_AT, FILE, ROW)


def rank_files(paths) -> dict[str, int]:
    """Each path's rank in path order: what FILE holds, so that comparing ranks compares paths."""
    return {path: rank for rank, path in enumerate(sorted(set(paths)))}


def key_table(uris: pa.Array, processed_at: pa.Array, file_rank: int, first_row: int = 0) -> pa.Table:
    """Key columns for ``len(uris)`` consecutive rows of one file starting at ``first_row``."""
    count = len(uris)
    return pa.table(
        {
            URI: uris,
            PROCESSED_AT: processed_at,
            FILE: pa.array(np.full(count, file_rank, dtype=np.int32)),
            ROW: pa.array(np.arange(first_row, first_row + count, dtype=np.int64)),
        }
    )


def newest_rows(keys: pa.Table) -> pa.Table:
    """The current row of each uri in ``keys`` (columns URI, PROCESSED_AT, FILE, ROW, and any others),
    sorted by uri."""
    if keys.num_rows == 0:
        return keys
    ranked = keys.sort_by([(URI, "ascending"), *((name, "descending") for name in NEWEST_FIRST)])
    uris = ranked[URI].combine_chunks()
    first_of_uri = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    keep = pa.concat_arrays([pa.array([True]), first_of_uri.fill_null(True)])
    return ranked.filter(keep)


def sql_is_newest(*, file: str = "filename", row: str = "file_row_number") -> str:
    """DuckDB predicate (for QUALIFY) true for the current row of each uri.

    ``file`` and ``row`` name the expressions holding a row's file path and
    position (read_parquet's ``filename`` and ``file_row_number``).
    """
    columns = {PROCESSED_AT: PROCESSED_AT, FILE: file, ROW: row}
    order = ", ".join(f"{columns[name]} DESC" for name in NEWEST_FIRST)
    return f"row_number() OVER (PARTITION BY {URI} ORDER BY {order}) = 1"


def is_gone(status: str | None) -> bool:
    """True when a uri whose current row has ``status`` is no longer in the source."""
    return status == STATUS_GONE


def sql_is_live(status: str = STATUS) -> str:
    """DuckDB predicate true unless the current row's ``status`` says the uri is gone."""
    return f"{status} IS DISTINCT FROM '{STATUS_GONE}'"
