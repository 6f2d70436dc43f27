"""Where rows go: atomic part files, resume state, and the final merge.

Layout
  --out captions.parquet   one file. While a run is going, rows are committed
                           as part files in ``captions.parquet.parts/``; at the
                           end the current row of every image (old and new) is
                           streamed into a new file that replaces the old one
                           in a single move.
  --out DIR/               a directory of ``part-*.parquet`` files; a rerun
                           adds parts and rewrites only the parts whose rows a
                           retry superseded.

Which row is current for an image is decided in one place, pipeline.rows;
resume (``load_state``), both merges and the search index ask it. Files of an
older schema version (v1) stay valid: resume reads only key columns, which
every version has, and the single-file merge upgrades their rows
(schemas.upgrade_table) as it streams them, so the merged file is v2.

Part files are written under a temporary dot-name and renamed into place: a
crash leaves whole parts or none, never half a file. Object stores (s3://,
gs://, ...) have no rename but publish a PUT whole, so there each part (small)
is serialized in memory and stored under its final name in one request. The
merged single file is streamed, a row group at a time, into a dot-named
temporary object and then copied server-side to its name. Readers ignore names
that start with '.' or '_'. The resolved run config is saved beside the output
(``captions.config.json`` / ``DIR/_captioner_config.json``).

Filesystems are opened through pipeline.storage, which turns backend errors
(missing s3fs/gcsfs, credentials, buckets) into OutputErrors naming the fix.
On object stores "directories" are only key prefixes: nothing is created
before writing (s3fs's makedirs would create a missing *bucket*), and a
listing is never answered from the listings cache, which may predate writes
made by another process or an earlier run.
"""

from __future__ import annotations

import collections
import fnmatch
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import rows as row_rule
from pipeline.decode import PERMANENT_ERROR_KINDS
from pipeline.storage import OutputError, explain, open_filesystem
from schemas import STATUS_OK, RunMetadata, SchemaMismatch, check_schema, output_schema, upgrade_schema, upgrade_table

__all__ = ["OutputError", "OutputStore", "PartWriter", "ResumeState", "RowState"]

PART_GLOB = "part-*.parquet"
# Columns that decide resume; reading only these keeps a rerun's start cheap.
_STATE_COLUMNS = ["uri", "status", "error_kind", "bytes", "processed_at"]
# Columns the merge reads to pick each image's current row.
_KEY_COLUMNS = [row_rule.URI, row_rule.PROCESSED_AT]


def is_part_name(name: str) -> bool:
    """Whether a file name is one of the part files a run writes (``part-*.parquet``)."""
    return fnmatch.fnmatchcase(name, PART_GLOB)


def parts_folder_of(single_file: str) -> str:
    """Where a single-file output's pending parts live: ``captions.parquet`` -> ``captions.parquet.parts``."""
    return single_file.rstrip("/") + ".parts"


@dataclass(frozen=True)
class FoundOutputs:
    """The data files of the captioner outputs under some locations (uris, sorted), and Parquet files beside them that are not."""

    files: list[str]
    foreign: list[str]


def find_output_files(uri: str, storage_options: dict | None = None) -> FoundOutputs:
    """The files that make up the captioner output(s) at ``uri``: the one rule the run, exports and the index share.

    A ``.parquet`` file is a single-file output: itself plus the committed
    parts of an unfinished run in ``NAME.parquet.parts/``. A folder holds
    outputs: its ``part-*.parquet`` files (a folder output) and, searched
    recursively, single files; names starting with '.' or '_' (temporaries,
    the saved config) are never data. A Parquet file found in a folder whose
    footer has no captioner metadata is not part of any output: it is
    returned in ``foreign``, not in ``files``. A missing location gives
    nothing (FileNotFoundError is the caller's to word).
    """
    from pipeline.storage import Folder

    root = Folder(uri, storage_options, role="source")
    if root.isfile():
        parent = Folder(_parent_uri(uri), storage_options, role="source")
        name = posixpath.basename(root.path)
        parts = posixpath.basename(parts_folder_of(name))
        pending = [parent.join(f"{parts}/{p}") for p in parent.folder(parts).list(PART_GLOB)]
        return FoundOutputs([root.display(), *pending], [])
    if not root.isdir():
        raise FileNotFoundError(uri)
    files, foreign = [], []
    for rel in root.list("*.parquet", recursive=True):
        full = root.join(rel)
        if _has_captioner_metadata(root, rel):
            files.append(full)
        else:
            foreign.append(full)
    return FoundOutputs(files, foreign)


def _parent_uri(uri: str) -> str:
    from pipeline.storage import is_local, local_path

    if is_local(uri):
        import os

        return os.path.dirname(local_path(uri))
    return uri.rstrip("/").rsplit("/", 1)[0]


def _has_captioner_metadata(folder, relative: str) -> bool:
    from schemas.base import META_PREFIX

    try:
        schema = pq.read_schema(folder.full(relative), filesystem=folder.fs)
    except (pa.ArrowException, OSError):
        return True  # unreadable: kept, so that the reader names the file and the failure
    return any(key.startswith(META_PREFIX.encode()) for key in (schema.metadata or {}))


@dataclass(frozen=True)
class RowState:
    """What resume needs of an image's current row."""

    ok: bool
    permanent: bool  # an error that the same bytes would give again (see decode.PERMANENT_ERROR_KINDS)
    size: int | None
    processed_at: float  # epoch seconds


@dataclass
class ResumeState:
    """What an existing output already holds: the current row of each image."""

    run: RunMetadata | None = None
    current: dict[str, RowState] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.current)

    @property
    def errors(self) -> int:
        return sum(not row.ok for row in self.current.values())

    def is_done(self, uri: str, size: int | None, mtime: float | None = None, retry_errors: bool = False) -> bool:
        """True when ``uri`` needs no new row.

        Done: its current row is ok, or failed for a permanent reason (the file
        itself is bad) and ``retry_errors`` is off; and the file has not
        changed since: same size, and not modified after the row was written.
        Missing, unreadable and model errors are always retried.
        """
        row = self.current.get(uri)
        if row is None:
            return False
        if not row.ok and (retry_errors or not row.permanent):
            return False
        if size is not None and row.size is not None and size != row.size:
            return False
        return mtime is None or mtime <= row.processed_at


class OutputStore:
    def __init__(self, output: str, storage_options: dict | None = None):
        self.output = output
        self.single_file = output.rstrip().lower().endswith(".parquet")
        self.fs, path = open_filesystem(output, storage_options, role="output")
        self.path = path.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)
        self.parts_dir = self.path + ".parts" if self.single_file else self.path
        # Time first, so part names sort in commit order across runs.
        self._run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self._seq = 0

    # ---- paths -------------------------------------------------------
    @property
    def config_path(self) -> str:
        if self.single_file:
            return self.path[: -len(".parquet")] + ".config.json"
        return posixpath.join(self.path, "_captioner_config.json")

    def _part_files(self) -> list[str]:
        self._forget_listings()
        # ls + fnmatch rather than glob: a folder name holding glob characters
        # ("out[1]/") must match itself literally.
        try:
            names = self.fs.ls(self.parts_dir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(name for name in names if fnmatch.fnmatchcase(posixpath.basename(name), PART_GLOB))

    def _abandoned_temp_files(self) -> list[str]:
        """Dot-named temporaries a killed writer left in the parts folder (readers never see them)."""
        try:
            names = self.fs.ls(self.parts_dir, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if fnmatch.fnmatchcase(posixpath.basename(n), ".part-*.parquet.tmp")]

    def data_files(self) -> list[str]:
        """Every committed file whose rows belong to the output."""
        files = self._part_files()  # also refreshes what isfile() below sees
        if self.single_file and self.fs.isfile(self.path):
            files = [self.path] + files
        return files

    def _display(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _forget_listings(self) -> None:
        # s3fs answers ls/isfile from listings it cached, and fsspec shares one
        # filesystem instance per set of options across the whole process.
        # invalidate_cache(path) drops the path and its parents.
        self.fs.invalidate_cache(self.parts_dir)
        self.fs.invalidate_cache(self.path)

    def _delete(self, paths: list[str]) -> None:
        # rm_file, not rm: fsspec's rm expands glob characters, so on a bucket
        # "run[1]/part-x.parquet" would match nothing (or another key).
        for path in paths:
            self.fs.rm_file(path)

    def _makedirs(self, path: str) -> None:
        # Only real filesystems need folders; on a bucket a prefix exists once
        # a key under it does.
        if self.is_local and path:
            self.fs.makedirs(path, exist_ok=True)

    # ---- preparing a run ------------------------------------------------
    def check_writable(self) -> None:
        self._check_not_a_foreign_file()
        parent = self.parts_dir if not self.single_file else posixpath.dirname(self.path)
        try:
            self._makedirs(parent or ".")
            probe = posixpath.join(parent or ".", f".captioner-write-test-{self._run_id}")
            self._write_bytes(probe, b"ok")
            self._delete([probe])
        except Exception as exc:  # backends raise their own types (no bucket, no credentials, ...)
            error = explain(exc, self.output, doing="write to", role="output")
            raise OutputError(f"{error}. Choose a writable --out location.") from exc

    def _check_not_a_foreign_file(self) -> None:
        """A folder output whose path is an existing file (``--out notes.txt``) is not ours to write into."""
        if self.single_file:
            return
        try:
            is_file = self.fs.isfile(self.path)
        except Exception:  # noqa: BLE001 - an unreachable store is check_writable's to explain
            return
        if is_file:
            shown = self._display(self.path)
            raise OutputError(
                f"{shown} exists and is not a captioner Parquet output (it is a file, and an --out that does not end "
                f"in .parquet is a folder of part files). Fix: pass --out NAME.parquet for one file, or --out DIR/ "
                f"for a folder; {shown} is left as it is"
            )

    def load_state(self, run: RunMetadata, *, overwrite: bool) -> ResumeState:
        """Read what is already there; refuse an output made by other models unless overwriting."""
        files = self.data_files()
        if files and overwrite:
            self.remove_all()
            return ResumeState()
        state = ResumeState()
        ranks = row_rule.rank_files(files)
        tables = []
        for path in files:
            state.run = self._check_file(path, run)
            table = pq.read_table(path, columns=_STATE_COLUMNS, filesystem=self.fs)
            keys = row_rule.key_table(table["uri"], table["processed_at"], ranks[path])
            tables.append(keys.append_column("status", table["status"]).append_column("error_kind", table["error_kind"])
                          .append_column("bytes", table["bytes"]))
        if not tables:
            return state
        current = row_rule.newest_rows(pa.concat_tables(tables))
        seconds = current["processed_at"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy() / 1e6
        for uri, status, kind, size, when in zip(
            current["uri"].to_pylist(), current["status"].to_pylist(), current["error_kind"].to_pylist(),
            current["bytes"].to_pylist(), seconds.tolist(),
        ):
            ok = status == STATUS_OK
            state.current[uri] = RowState(ok, not ok and kind in PERMANENT_ERROR_KINDS, size, when)
        return state

    def _check_file(self, path: str, run: RunMetadata) -> RunMetadata:
        try:
            schema = pq.read_schema(path, filesystem=self.fs)
            existing = check_schema(schema, where=self._display(path))
        except SchemaMismatch as exc:
            raise OutputError(f"{exc}. Pass --overwrite to replace it, or choose another --out.") from exc
        except pa.ArrowInvalid as exc:
            raise OutputError(
                f"{self._display(path)} is not a readable Parquet file ({exc}). "
                "Pass --overwrite to replace it, or choose another --out."
            ) from exc
        if existing.models_signature() != run.models_signature():
            raise OutputError(
                f"{self._display(path)} was made with {_describe_signature(existing)}; this run uses "
                f"{_describe_signature(run)}. Pass --overwrite to replace it, or choose another --out."
            )
        return existing

    def remove_all(self) -> None:
        self._delete(self.data_files())

    def save_config(self, text: str) -> None:
        self._write_bytes(self.config_path, text.encode())

    # ---- writing --------------------------------------------------------
    def write_part(self, table: pa.Table) -> str:
        self._makedirs(self.parts_dir)
        self._seq += 1
        final = posixpath.join(self.parts_dir, f"part-{self._run_id}-{self._seq:05d}.parquet")
        # Sorted by uri, each part covers a narrow range of the (sorted)
        # listing, so the merge reads each of its row groups about once.
        self._write_table(final, table.sort_by("uri"))
        return final

    def _write_table(self, final: str, table: pa.Table) -> None:
        if not self.is_local:
            # Whole file first, then one PUT. Streaming into an s3fs file is not
            # safe: pyarrow closes the file even when writing fails, and closing
            # completes the upload, publishing a partial file under the final name.
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer)
            self._write_bytes(final, buffer.getvalue().to_pybytes())
            return
        tmp = posixpath.join(posixpath.dirname(final), "." + posixpath.basename(final) + ".tmp")
        try:
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def _move(self, source: str, target: str) -> None:
        if self.is_local:
            self.fs.mv(source, target)  # a rename
            return
        # A server-side copy (multipart above 5 GB on S3); cp_file and
        # rm_file, not mv, which expands glob characters in the key.
        self.fs.cp_file(source, target)
        self.fs.rm_file(source)

    def _write_bytes(self, final: str, data: bytes) -> None:
        if not self.is_local:
            self.fs.pipe_file(final, data)
            return
        parent = posixpath.dirname(final)
        self._makedirs(parent)
        tmp = posixpath.join(parent, "." + posixpath.basename(final) + ".tmp")
        with self.fs.open(tmp, "wb") as handle:
            handle.write(data)
        self.fs.mv(tmp, final)

    # ---- finishing --------------------------------------------------------
    # Rows per row group of a merged single file, and how many bytes of part
    # row groups the merge keeps decoded at once: its memory does not grow
    # with the output.
    merge_rows_per_group = 4096
    merge_cache_bytes = 256 << 20
    # Row groups the last merge read (each part row group about once when parts are sorted).
    merge_row_groups_read = 0

    def finalize(self, schema: pa.Schema | None, *, run: RunMetadata | None = None) -> int:
        """Leave exactly one row per uri (the newest, see pipeline.rows); return the row count.

        ``schema`` is this run's output schema; None when this run wrote nothing.
        When the output holds no file at all (nothing listed) and ``run`` is
        given, an empty file with the schema is written, so that the output
        exists and `captioner index` reads it.
        """
        if not self.data_files() and (schema is not None or run is not None):
            self._write_empty(schema or output_schema(run.embedding_dim, run))
            return 0
        if self.single_file:
            return self._merge_into_single_file(schema)
        return self._drop_superseded_rows()

    def _write_empty(self, schema: pa.Schema) -> None:
        empty = schema.empty_table()
        if self.single_file:
            self._write_table(self.path, empty)
        else:
            self.write_part(empty)

    def _current_rows(self, files: list[str]) -> pa.Table:
        """(uri, processed_at, file rank, row) of each image's current row, sorted by uri; key columns only."""
        ranks = row_rule.rank_files(files)
        keys = []
        for path in files:
            table = pq.read_table(path, columns=_KEY_COLUMNS, filesystem=self.fs)
            keys.append(row_rule.key_table(table[row_rule.URI], table[row_rule.PROCESSED_AT], ranks[path]))
        return row_rule.newest_rows(pa.concat_tables(keys)) if keys else None

    def _merge_into_single_file(self, schema: pa.Schema | None) -> int:
        files = self.data_files()
        parts = self._part_files()
        if not parts:
            return pq.read_metadata(self.path, filesystem=self.fs).num_rows if files else 0
        # Rows of older schema versions (an earlier run's file or parts) are
        # upgraded as they are read, so the merged file is one current version.
        target = schema or upgrade_schema(pq.read_schema(parts[-1], filesystem=self.fs))
        current = self._current_rows(files)
        by_rank = sorted(files)  # rank -> path, as rank_files numbered them
        self._stream_rows(self.path, target, by_rank, current)
        self._delete(parts)
        if self.is_local:  # on a bucket the prefix is gone with its last key
            self._delete(self._abandoned_temp_files())
            try:
                self.fs.rmdir(self.parts_dir)
            except OSError:
                pass
        return current.num_rows

    def _stream_rows(self, final: str, schema: pa.Schema, files: list[str], current: pa.Table) -> None:
        """Write the rows ``current`` names, in its order, into ``final``, a row group at a time.

        Part row groups are read as they are needed and kept in a small
        least-recently-used cache; nothing else of the inputs is held.
        The file is written under a temporary dot-name and moved into place
        (on a bucket: copied server-side), so a failure never publishes half a file.
        """
        reader = _RowGroupReader(self.fs, files, schema, self.merge_cache_bytes)
        tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.merging-{self._run_id}")
        try:
            with self.fs.open(tmp, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
                step = self.merge_rows_per_group
                ranks = current[row_rule.FILE].to_numpy()
                positions = current[row_rule.ROW].to_numpy()
                for start in range(0, current.num_rows, step):
                    writer.write_table(reader.take(ranks[start : start + step], positions[start : start + step]))
            self._move(tmp, final)
        finally:
            self.merge_row_groups_read = reader.row_groups_read
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)

    def _drop_superseded_rows(self) -> int:
        if self.is_local:
            self._delete(self._abandoned_temp_files())
        files = self._part_files()
        current = self._current_rows(files)
        if current is None:
            return 0
        kept_per_rank = collections.defaultdict(list)
        for rank, position in zip(current[row_rule.FILE].to_pylist(), current[row_rule.ROW].to_pylist()):
            kept_per_rank[rank].append(position)
        for rank, path in enumerate(sorted(files)):
            kept = kept_per_rank.get(rank, [])
            rows = pq.read_metadata(path, filesystem=self.fs).num_rows
            if len(kept) == rows and (rows or current.num_rows == 0):
                continue
            if kept:  # parts are small (rows_per_part): rewriting one whole is fine
                self._write_table(path, pq.read_table(path, filesystem=self.fs).take(pa.array(sorted(kept))))
            else:  # superseded entirely, or an empty placeholder now that rows exist
                self._delete([path])
        return current.num_rows


class _RowGroupReader:
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


def _describe_signature(run: RunMetadata) -> str:
    return (
        f"caption_model={run.caption_model}@{run.caption_revision}, "
        f"embed_model={run.embed_model}@{run.embed_revision}, probe set {run.probe_set_hash[:12]}"
    )


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


class PartWriter:
    """Buffers the rows streamed back from the stages and commits a part file every ``rows_per_part`` rows."""

    def __init__(self, store: OutputStore, rows_per_part: int):
        self.store = store
        self.rows_per_part = rows_per_part
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.schema: pa.Schema | None = None

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
            self.buffer, self.buffered = [rows], rows.num_rows

    def flush(self) -> None:
        if self.buffered:
            self.store.write_part(pa.concat_tables(self.buffer))
        self.buffer, self.buffered = [], 0


def _schema_of(table: pa.Table) -> pa.Schema:
    from schemas import output_schema, read_metadata

    run = read_metadata(table.schema)
    if run is None:
        raise RuntimeError("a stage returned a batch without captioner metadata; conform_batch was skipped")
    return output_schema(run.embedding_dim, run)
