"""Part files: their names, the writer that commits them, and which files make up an output.

A run commits rows as ``part-<time>-<run>-<seq>.parquet`` files, each written
whole through pipeline.storage.Folder (a temporary dot-name renamed into
place; one PUT on a bucket). :func:`find_output_files` is the one rule for
which files belong to an output, used by the run (resume, merge), exports
and the search index alike.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
PARTS_SUFFIX = ".parts"


def is_part_name(name: str) -> bool:
    """Whether a file name is one of the part files a run writes (``part-*.parquet``)."""
    return fnmatch.fnmatchcase(name, PART_GLOB)


def part_name(run_id: str, seq: int) -> str:
    """The name of a run's ``seq``-th part; time first in ``run_id``, so names sort in commit order across runs."""
    return f"part-{run_id}-{seq:05d}.parquet"


def parts_folder_of(single_file: str) -> str:
    """Where a single-file output's pending parts live: ``captions.parquet`` -> ``captions.parquet.parts``."""
    return single_file.rstrip("/") + PARTS_SUFFIX


@dataclass(frozen=True)
class FoundOutputs:
    """The data files of the captioner outputs at a location (uris), and Parquet files beside them that are not."""

    files: list[str]
    foreign: list[str]


def find_output_files(uri: str, storage_options: dict | None = None) -> FoundOutputs:
    """The files that make up the captioner output(s) at ``uri``.

    A ``.parquet`` file is a single-file output: itself plus the committed
    parts of an unfinished run in ``NAME.parquet.parts/``. A folder holds
    outputs: its ``part-*.parquet`` files (a folder output) and, searched
    recursively, single files and their parts; names starting with '.' or
    '_' (temporaries, the saved config) are never data. A Parquet file found
    in a folder whose footer has no captioner metadata is not part of any
    output: it is returned in ``foreign``, not in ``files``. A missing
    location raises FileNotFoundError, for the caller to word.
    """
    from pipeline.storage import Folder, name_of, parent_of

    root = Folder(uri, storage_options, role="source")
    is_file = root.isfile()
    if is_file or (not root.isdir() and uri.rstrip("/").lower().endswith(".parquet")):
        parent = Folder(parent_of(uri), storage_options, role="source")
        parts = parts_folder_of(name_of(uri))
        pending = [parent.join(f"{parts}/{p}") for p in parent.folder(parts).list(PART_GLOB)]
        # Before its first run finishes, a single-file output is only the parts committed so far
        # (and the first merge may have published the file just now, taking its parts away).
        if not is_file and not pending:
            if not root.isfile():
                raise FileNotFoundError(uri)
            is_file = True
        return FoundOutputs([root.display()] * is_file + pending, [])
    if not root.isdir():
        raise FileNotFoundError(uri)
    files, foreign = [], []
    for rel in root.list("*.parquet", recursive=True):
        (files if _has_captioner_metadata(root, rel) else foreign).append(root.join(rel))
    return FoundOutputs(files, foreign)


def _has_captioner_metadata(folder, relative: str) -> bool:
    from schemas.base import META_PREFIX

    try:
        schema = pq.read_schema(folder.full(relative), filesystem=folder.fs)
    except (pa.ArrowException, OSError):
        return True  # unreadable: kept, so that the reader names the file and the failure
    return any(key.startswith(META_PREFIX.encode()) for key in (schema.metadata or {}))


class PartWriter:
    """Buffers the rows streamed back from the stages and commits a part file every ``rows_per_part`` rows."""

    def __init__(self, store, rows_per_part: int):
        self.store = store
        self.rows_per_part = rows_per_part
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.schema: pa.Schema | None = None
        # Rows written to part files so far (what a failed run says it kept).
        self.committed = 0

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = _schema_of(table)
        # Ray may hand back blocks without the schema's key/value metadata.
        self.buffer.append(table.select(self.schema.names).cast(self.schema))
        self.buffered += table.num_rows
        if self.buffered >= self.rows_per_part:
            rows = pa.concat_tables(self.buffer)
            while rows.num_rows >= self.rows_per_part:
                self.store.write_part(rows.slice(0, self.rows_per_part))
                rows = rows.slice(self.rows_per_part)
                # Kept current part by part: after a failed write (a full disk) the buffer
                # holds exactly the rows not committed, and a flush does not write any twice.
                self.buffer, self.buffered = [rows], rows.num_rows
                self.committed += self.rows_per_part

    def flush(self) -> None:
        if self.buffered:
            self.store.write_part(pa.concat_tables(self.buffer))
            self.committed += self.buffered
        self.buffer, self.buffered = [], 0


def _schema_of(table: pa.Table) -> pa.Schema:
    from schemas import output_schema, read_metadata

    run = read_metadata(table.schema)
    if run is None:
        raise RuntimeError("a stage returned a batch without captioner metadata; conform_batch was skipped")
    return output_schema(run.embedding_dim, run)
