"""Where rows go: atomic part files, resume state, and the final merge.

Layout
  --out captions.parquet   one file. While a run is going, rows are committed
                           as part files in ``captions.parquet.parts/``; at the
                           end every row (old and new) is merged into a new
                           file that replaces the old one in a single rename.
  --out DIR/               a directory of ``part-*.parquet`` files; a rerun
                           adds parts and rewrites only the parts whose rows a
                           retry superseded.

Part files are written under a temporary dot-name and renamed into place: a
crash leaves whole parts or none, never half a file. Object stores (s3://,
gs://, ...) have no rename but publish a PUT whole, so there each file is
serialized in memory and stored under its final name in one request. Readers
ignore names that start with '.' or '_'. The resolved run config is saved
beside the output (``captions.config.json`` / ``DIR/_captioner_config.json``).

On object stores "directories" are only key prefixes: nothing is created
before writing (s3fs's makedirs would create a missing *bucket*), and a
listing is never answered from the listings cache, which may predate writes
made by another process or an earlier run.
"""

from __future__ import annotations

import fnmatch
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import STATUS_OK, RunMetadata, SchemaMismatch, check_schema

PART_GLOB = "part-*.parquet"
# Columns that decide resume; reading only these keeps a rerun's start cheap.
_STATE_COLUMNS = ["uri", "status", "bytes", "processed_at"]


class OutputError(RuntimeError):
    """The output cannot be used as asked; the message says how to fix it."""


@dataclass
class ResumeState:
    """What an existing output already holds."""

    run: RunMetadata | None = None
    rows: int = 0
    # uri -> file size of rows that finished with status ok
    done: dict[str, int | None] = field(default_factory=dict)
    errors: int = 0

    def is_done(self, uri: str, size: int | None) -> bool:
        if uri not in self.done:
            return False
        recorded = self.done[uri]
        # A file whose size changed since it was captioned is new content.
        return size is None or recorded is None or recorded == size


class OutputStore:
    def __init__(self, output: str, storage_options: dict | None = None):
        self.output = output
        self.single_file = output.rstrip().lower().endswith(".parquet")
        self.fs, path = fsspec.core.url_to_fs(output, **(storage_options or {}))
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
        parent = self.parts_dir if not self.single_file else posixpath.dirname(self.path)
        try:
            self._makedirs(parent or ".")
            probe = posixpath.join(parent or ".", f".captioner-write-test-{self._run_id}")
            self._write_bytes(probe, b"ok")
            self._delete([probe])
        except Exception as exc:  # backends raise their own types (no bucket, no credentials, ...)
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, (FileExistsError, NotADirectoryError)):
                reason += " (a parent of the output path is a file, not a folder)"
            raise OutputError(
                f"cannot write to {self.output}: {reason}. Choose a writable --out location"
                + ("." if self.is_local else ", or check the bucket name, credentials and --storage-option values.")
            ) from exc

    def load_state(self, run: RunMetadata, *, overwrite: bool) -> ResumeState:
        """Read what is already there; refuse an output made by other models unless overwriting."""
        files = self.data_files()
        if files and overwrite:
            self.remove_all()
            return ResumeState()
        state = ResumeState()
        for path in files:
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
            state.run = existing
            table = pq.read_table(path, columns=_STATE_COLUMNS, filesystem=self.fs)
            state.rows += table.num_rows
            for uri, status, size in zip(
                table["uri"].to_pylist(), table["status"].to_pylist(), table["bytes"].to_pylist()
            ):
                if status == STATUS_OK:
                    state.done[uri] = size
                else:
                    state.done.pop(uri, None)
        state.errors = state.rows - len(state.done)
        return state

    def remove_all(self) -> None:
        self._delete(self.data_files())

    def save_config(self, text: str) -> None:
        self._write_bytes(self.config_path, text.encode())

    # ---- writing --------------------------------------------------------
    def write_part(self, table: pa.Table) -> str:
        self._makedirs(self.parts_dir)
        self._seq += 1
        final = posixpath.join(self.parts_dir, f"part-{self._run_id}-{self._seq:05d}.parquet")
        self._write_table(final, table)
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
    def finalize(self, schema: pa.Schema | None) -> int:
        """Leave exactly one row per uri (the newest); return the row count.

        ``schema`` is this run's output schema; None when this run wrote nothing.
        """
        if self.single_file:
            return self._merge_into_single_file(schema)
        return self._drop_superseded_rows()

    def _merge_into_single_file(self, schema: pa.Schema | None) -> int:
        files = self.data_files()
        parts = self._part_files()
        if not parts:
            return pq.read_metadata(self.path, filesystem=self.fs).num_rows if files else 0
        tables = [pq.read_table(path, filesystem=self.fs) for path in files]
        target = schema or tables[-1].schema
        merged = _newest_row_per_uri(pa.concat_tables([t.cast(target) for t in tables]))
        merged = merged.sort_by("uri").replace_schema_metadata(target.metadata)
        self._write_table(self.path, merged)
        self._delete(parts)
        if self.is_local:  # on a bucket the prefix is gone with its last key
            self._delete(self._abandoned_temp_files())
            try:
                self.fs.rmdir(self.parts_dir)
            except OSError:
                pass
        return merged.num_rows

    def _drop_superseded_rows(self) -> int:
        if self.is_local:
            self._delete(self._abandoned_temp_files())
        files = self._part_files()
        latest: dict[str, tuple] = {}
        per_file: dict[str, pa.Table] = {}
        for path in files:
            table = pq.read_table(path, columns=["uri", "processed_at"], filesystem=self.fs)
            per_file[path] = table
            for uri, when in zip(table["uri"].to_pylist(), table["processed_at"].to_pylist()):
                if uri not in latest or (when, path) >= latest[uri]:
                    latest[uri] = (when, path)
        for path, table in per_file.items():
            keep = [latest[uri][1] == path for uri in table["uri"].to_pylist()]
            if all(keep):
                continue
            full = pq.read_table(path, filesystem=self.fs)
            kept = full.filter(pa.array(keep))
            if kept.num_rows:
                self._write_table(path, kept)
            else:
                self._delete([path])
        return len(latest)


def _newest_row_per_uri(table: pa.Table) -> pa.Table:
    # Later rows win on equal timestamps: parts are concatenated in commit order.
    order = pa.array(range(table.num_rows))
    table = table.append_column("_order", order)
    ranked = table.sort_by([("uri", "ascending"), ("processed_at", "descending"), ("_order", "descending")])
    uris = ranked["uri"]
    first = pc.not_equal(uris.slice(1), uris.slice(0, max(len(uris) - 1, 0)))
    keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()]) if len(uris) else pa.array([], pa.bool_())
    return ranked.filter(keep).drop_columns(["_order"])


def _describe_signature(run: RunMetadata) -> str:
    return (
        f"caption_model={run.caption_model}@{run.caption_revision}, "
        f"embed_model={run.embed_model}@{run.embed_revision}, probe set {run.probe_set_hash[:12]}"
    )


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
