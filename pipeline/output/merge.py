"""The final merge: exactly one row per image (the newest, pipeline.rows) in the output.

A single-file output streams the current row of every image, a row group at
a time, into a temporary file moved into place (pipeline.storage.Folder.open_staged:
on a bucket a dot-named object copied server-side); a folder output rewrites
only the parts whose rows a retry superseded. Rows of an older schema version
are upgraded (schemas.upgrade_table) as they are read, so a merged file is one
current version.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import rows as row_rule
from schemas import RunMetadata, output_schema, upgrade_schema, upgrade_table

# Columns the merge reads to pick each image's current row.
_KEY_COLUMNS = [row_rule.URI, row_rule.PROCESSED_AT]


def finalize(store, schema: pa.Schema | None, *, run: RunMetadata | None = None) -> int:
    """Leave exactly one row per uri in ``store``; return the row count.

    ``schema`` is this run's output schema; None when this run wrote nothing.
    When the output holds no file at all (nothing listed) and ``run`` is
    given, an empty file with the schema is written, so that the output
    exists and `captioner index` reads it.
    """
    if not store.data_files() and (schema is not None or run is not None):
        write_empty(store, schema or output_schema(run.embedding_dim, run))
        return 0
    if store.single_file:
        return merge_into_single_file(store, schema)
    return drop_superseded_rows(store)


def write_empty(store, schema: pa.Schema) -> None:
    empty = schema.empty_table()
    if store.single_file:
        store._write_table(store.name, empty)
    else:
        store.write_part(empty)


def current_rows(store, files: list[str]) -> pa.Table | None:
    """(uri, processed_at, file rank, row) of each image's current row, sorted by uri; key columns only."""
    ranks = row_rule.rank_files(files)
    keys = []
    for path in files:
        table = pq.read_table(path, columns=_KEY_COLUMNS, filesystem=store.fs)
        keys.append(row_rule.key_table(table[row_rule.URI], table[row_rule.PROCESSED_AT], ranks[path]))
    return row_rule.newest_rows(pa.concat_tables(keys)) if keys else None


def merge_into_single_file(store, schema: pa.Schema | None) -> int:
    files = store.data_files()
    parts = store._part_files()
    if not parts:
        return pq.read_metadata(store.path, filesystem=store.fs).num_rows if files else 0
    target = schema or upgrade_schema(pq.read_schema(parts[-1], filesystem=store.fs))
    current = current_rows(store, files)
    by_rank = sorted(files)  # rank -> path, as rank_files numbered them
    stream_rows(store, target, by_rank, current)
    store._delete(parts)
    store.cleanup_temp_files()
    store.root.remove_empty(store.parts_rel)  # on a bucket the prefix is gone with its last key
    return current.num_rows


def stream_rows(store, schema: pa.Schema, files: list[str], current: pa.Table) -> None:
    """Write the rows ``current`` names, in its order, into the single file, a row group at a time.

    Part row groups are read as they are needed and kept in a small
    least-recently-used cache; nothing else of the inputs is held. A failure
    never publishes half a file (Folder.open_staged).
    """
    reader = RowGroupReader(store.fs, files, schema, store.merge_cache_bytes)
    try:
        with store.root.open_staged(store.name) as handle, pq.ParquetWriter(handle, schema) as writer:
            step = store.merge_rows_per_group
            ranks = current[row_rule.FILE].to_numpy()
            positions = current[row_rule.ROW].to_numpy()
            for start in range(0, current.num_rows, step):
                writer.write_table(reader.take(ranks[start : start + step], positions[start : start + step]))
    finally:
        store.merge_row_groups_read = reader.row_groups_read


def drop_superseded_rows(store) -> int:
    store.cleanup_temp_files()
    files = store._part_files()
    current = current_rows(store, files)
    if current is None:
        return 0
    kept_per_rank = collections.defaultdict(list)
    for rank, position in zip(current[row_rule.FILE].to_pylist(), current[row_rule.ROW].to_pylist()):
        kept_per_rank[rank].append(position)
    for rank, path in enumerate(sorted(files)):
        kept = kept_per_rank.get(rank, [])
        rows = pq.read_metadata(path, filesystem=store.fs).num_rows
        if len(kept) == rows and (rows or current.num_rows == 0):
            continue
        if kept:  # parts are small (rows_per_part): rewriting one whole is fine
            table = pq.read_table(path, filesystem=store.fs).take(pa.array(sorted(kept)))
            store._write_table(store.root.relative(path), table)
        else:  # superseded entirely, or an empty placeholder now that rows exist
            store._delete([path])
    return current.num_rows


class RowGroupReader:
    """Rows by (file rank, row) from Parquet files, reading whole row groups through an LRU cache."""

    def __init__(self, fs, files: list[str], schema: pa.Schema, cache_bytes: int):
        self.fs = fs
        self.files = files
        self.schema = schema
        self.cache_bytes = cache_bytes
        self._cache: collections.OrderedDict[tuple[int, int], pa.Table] = collections.OrderedDict()
        self._cached = 0
        self._parquet: dict[int, pq.ParquetFile] = {}
        self._starts: dict[int, np.ndarray] = {}
        self.row_groups_read = 0

    def _file(self, rank: int) -> pq.ParquetFile:
        if rank not in self._parquet:
            parquet = pq.ParquetFile(self.fs.open(self.files[rank], "rb"))
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
            self._starts[rank] = np.cumsum([0, *sizes])
            self._parquet[rank] = parquet
        return self._parquet[rank]

    def _row_group(self, rank: int, group: int) -> pa.Table:
        key = (rank, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = upgrade_table(self._file(rank).read_row_group(group)).select(self.schema.names).cast(self.schema)
        self.row_groups_read += 1
        self._cache[key] = table
        self._cached += table.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached -= dropped.nbytes
        return table

    def take(self, ranks: np.ndarray, rows: np.ndarray) -> pa.Table:
        """The rows at (ranks[i], rows[i]), in that order, as one table of ``schema``."""
        pieces, order = [], []
        for rank in np.unique(ranks):
            self._file(int(rank))
            in_file = np.flatnonzero(ranks == rank)
            starts = self._starts[int(rank)]
            groups = np.searchsorted(starts, rows[in_file], side="right") - 1
            for group in np.unique(groups):
                chosen = in_file[groups == group]
                table = self._row_group(int(rank), int(group))
                pieces.append(table.take(pa.array(rows[chosen] - starts[group])))
                order.append(chosen)
        if not pieces:
            return self.schema.empty_table()
        merged = pa.concat_tables(pieces)
        return merged.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
