"""OutputStore: one captioner output (a single file or a folder of parts), read and written through pipeline.storage.

Layout
  --out captions.parquet   one file. While a run is going, rows are committed
                           as part files in ``captions.parquet.parts/``; at the
                           end the current row of every image (old and new) is
                           streamed into a new file that replaces the old one
                           in a single move (pipeline.output.merge).
  --out DIR/               a directory of ``part-*.parquet`` files; a rerun
                           adds parts and rewrites only the parts whose rows a
                           retry superseded.

Every file is written through pipeline.storage.Folder: under the one
temporary dot-name rule and renamed into place locally, one PUT on an object
store (s3://, gs://, ...), so a crash leaves whole parts or none. Readers
ignore names that start with '.' or '_'. The resolved run config is saved
beside the output (``captions.config.json`` / ``DIR/_captioner_config.json``), and human labels
there too (``captions.labels.json`` / ``DIR/_captioner_labels.json``, pipeline.labels.store).
Backend errors (missing s3fs/gcsfs, credentials, buckets) become OutputErrors
naming the fix.
"""

from __future__ import annotations

import posixpath
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output import merge, resume
from pipeline.output.parts import PART_GLOB, part_name, parts_folder_of
from pipeline.output.resume import ResumeState
from pipeline.storage import Folder, OutputError, explain, name_of, parent_of, temp_name
from schemas import RunMetadata


class OutputStore:
    def __init__(self, output: str, storage_options: dict | None = None):
        self.output = output
        self.single_file = output.rstrip().lower().endswith(".parquet")
        if self.single_file:
            # The folder holding the file, its parts folder and its config.
            self.root = Folder(parent_of(output), storage_options, role="output")
            self.name = name_of(output)
            self.parts_rel = parts_folder_of(self.name)
        else:
            self.root = Folder(output, storage_options, role="output")
            self.name = ""
            self.parts_rel = ""
        self.fs = self.root.fs
        self.path = self.root.full(self.name)
        self.is_local = self.root.local
        self.parts_dir = self.root.full(self.parts_rel)
        self._parts = self.root.folder(self.parts_rel) if self.parts_rel else self.root
        # Time first, so part names sort in commit order across runs.
        self._run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self._seq = 0

    # ---- paths -------------------------------------------------------
    @property
    def config_rel(self) -> str:
        return self.name[: -len(".parquet")] + ".config.json" if self.single_file else "_captioner_config.json"

    @property
    def labels_rel(self) -> str:
        """Human labels of this output's images (pipeline.labels.store): ``captions.labels.json`` / ``DIR/_captioner_labels.json``."""
        return self.name[: -len(".parquet")] + ".labels.json" if self.single_file else "_captioner_labels.json"

    @property
    def config_path(self) -> str:
        return self.root.full(self.config_rel)

    def _part_files(self) -> list[str]:
        return [self._parts.full(name) for name in self._parts.list(PART_GLOB)]

    def data_files(self) -> list[str]:
        """Every committed file whose rows belong to the output (pipeline.output.parts's rule)."""
        files = self._part_files()
        if self.single_file and self.root.isfile(self.name):
            files = [self.path] + files
        return files

    def _display(self, path: str) -> str:
        return self.root.display(self.root.relative(path))

    def _delete(self, paths: list[str]) -> None:
        for path in paths:
            self.root.delete(self.root.relative(path))

    # ---- preparing a run ------------------------------------------------
    def check_writable(self) -> None:
        self._check_not_a_foreign_file()
        try:
            self._parts.makedirs() if not self.single_file else self.root.makedirs()
            probe = temp_name("captioner-write-test")
            self.root.write(probe, b"ok")
            self.root.delete(probe)
        except Exception as exc:  # backends raise their own types (no bucket, no credentials, ...)
            error = explain(exc, self.output, doing="write to", role="output")
            raise OutputError(f"{error}. Choose a writable --out location.") from exc

    def _check_not_a_foreign_file(self) -> None:
        """A folder output whose path is an existing file (``--out notes.txt``) is not ours to write into."""
        if self.single_file:
            return
        try:
            is_file = self.root.isfile()
        except Exception:  # noqa: BLE001 - an unreachable store is check_writable's to explain
            return
        if is_file:
            shown = self.root.display()
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
        return resume.load_state(self.fs, files, run, self._display)

    def remove_all(self) -> None:
        self._delete(self.data_files())

    def save_config(self, text: str) -> None:
        self.root.write(self.config_rel, text.encode())

    # ---- writing --------------------------------------------------------
    def write_part(self, table: pa.Table) -> str:
        self._seq += 1
        rel = posixpath.join(self.parts_rel, part_name(self._run_id, self._seq)) if self.parts_rel else part_name(self._run_id, self._seq)
        # Sorted by uri, each part covers a narrow range of the (sorted)
        # listing, so the merge reads each of its row groups about once.
        self._write_table(rel, table.sort_by("uri"))
        return self.root.full(rel)

    def _write_table(self, rel: str, table: pa.Table) -> None:
        # Folder.open_write: a whole file or none (on a bucket serialized in
        # memory, then one PUT: pyarrow closes the file even when writing
        # fails, and closing an s3fs file would publish the partial upload).
        with self.root.open_write(rel) as handle:
            pq.write_table(table, handle)

    def take_lease(self, command: str):
        """Hold the output's lease (pipeline.lease), then remove what killed writers left: no live writer owns it now."""
        from pipeline.lease import STALE_AFTER_S, lease_for_file, lease_for_folder

        if self.single_file:
            lease = lease_for_file(self.root.join(self.name), self.root.storage_options, what=self.output, command=command)
        else:
            lease = lease_for_folder(self.output, self.root.storage_options, what=self.output, command=command)
        lease.acquire()
        # On a bucket a listing may lag a moment behind a writer that just stopped: keep fresh ones.
        older_than = None if self.is_local else STALE_AFTER_S
        self._parts.cleanup_temp_files(older_than=older_than)
        if self.single_file:
            ours = (self.name, self.config_rel, "captioner-write-test", lease.name)
            self.root.cleanup_temp_files(older_than=older_than, of=ours)
        return lease

    def cleanup_temp_files(self) -> None:
        """Remove the temporaries a killed writer left in the parts folder (readers never see them)."""
        self._parts.cleanup_temp_files()

    # ---- finishing --------------------------------------------------------
    # Rows per row group of a merged single file, and how many bytes of part
    # row groups the merge keeps decoded at once: its memory does not grow
    # with the output.
    merge_rows_per_group = 4096
    merge_cache_bytes = 256 << 20
    # Row groups the last merge read (each part row group about once when parts are sorted).
    merge_row_groups_read = 0

    def finalize(self, schema: pa.Schema | None, *, run: RunMetadata | None = None) -> int:
        """Leave exactly one row per uri (the newest, see pipeline.rows); return the row count (pipeline.output.merge)."""
        return merge.finalize(self, schema, run=run)
