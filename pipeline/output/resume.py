"""Resume: what an existing output already holds, and whether an image needs a new row.

Which row is current for an image is decided in one place, pipeline.rows.
Resume reads only key columns, which every schema version has (source_mtime,
new in v3, is read as null from older files), so files of older versions stay valid.
A uri whose current row is ``gone`` (schema v4: its file left the source) is
never done: listed again, its file is new to the run (or reuses that row,
pipeline.output.lifecycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import rows as row_rule
from pipeline.sources import mtime_micros
from pipeline.storage import OutputError
from schemas import STATUS_OK, RunMetadata, SchemaMismatch, check_schema, output_schema, upgrade_table
from schemas.errors import PERMANENT_ERROR_KINDS

# Columns that decide resume; reading only these keeps a rerun's start cheap.
# source_mtime is null in rows upgraded from v1/v2 files, which lack it.
# ocr_revision (v5) tells a row read by this run's OCR model from one read by none or another.
_STATE_COLUMNS = ["uri", "status", "error_kind", "image_id", "bytes", "source_mtime", "processed_at", "ocr_revision"]


@dataclass(frozen=True)
class RowState:
    """What resume needs of an image's current row."""

    ok: bool  # status ok; for a gone row (a copy of the file's last row): that row was ok
    permanent: bool  # an error that the same bytes would give again (see schemas.errors)
    size: int | None
    processed_at: float  # epoch seconds
    mtime_us: int | None = None  # the source's mtime as listed for this row (source_mtime); None: not recorded
    image_id: str | None = None  # sha256 of the bytes the row was made from
    gone: bool = False  # the file left the source (status gone): never done, a copy to reuse (pipeline.output.lifecycle)
    file: int = 0  # where the row is: the rank of its file in ResumeState.files, and its position there
    row: int = 0
    ocr_revision: str | None = None  # the OCR model that read the row's text; None: OCR never ran on it


@dataclass
class ResumeState:
    """What an existing output already holds: the current row of each image."""

    run: RunMetadata | None = None
    current: dict[str, RowState] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # the output's data files, in rank order (RowState.file)
    # The OCR model this run reads text with (None: OCR off). OCR is not in the models' signature, so an
    # output made without it is not refused; its ok rows are redone instead (is_done).
    ocr_revision: str | None = None

    @property
    def rows(self) -> int:
        """Images the output holds (uris whose file left the source not counted)."""
        return sum(not row.gone for row in self.current.values())

    @property
    def errors(self) -> int:
        return sum(not row.ok and not row.gone for row in self.current.values())

    def is_done(
        self,
        uri: str,
        size: int | None,
        mtime: float | None = None,
        retry_errors: bool = False,
        digest: Callable[[], str | None] | None = None,
    ) -> bool:
        """True when ``uri`` needs no new row.

        Done: its current row is ok, or failed for a permanent reason (the file
        itself is bad) and ``retry_errors`` is off; and the file is the one the
        row was made from: the listed ``size`` and ``mtime`` (epoch seconds)
        equal the row's ``bytes`` and ``source_mtime``. Any other mtime, older
        or newer, means new bytes may be there (``cp -p``, ``rsync -a``, a
        restore): redone. When that cannot be told (a v1/v2 row, which records
        no mtime, or a listing without size or mtime), ``digest()`` (the sha256
        of the file's bytes now, None if unreadable) is compared with the row's
        ``image_id``; without ``digest`` the file is redone. Missing,
        unreadable and model errors are always retried.
        """
        row = self.current.get(uri)
        if row is None or row.gone:
            return False
        if not row.ok and (retry_errors or not row.permanent):
            return False
        if row.ok and self.ocr_revision is not None and row.ocr_revision != self.ocr_revision:
            return False  # this run reads text and the row's text was not read by its OCR model
        if size is not None and row.size is not None and size != row.size:
            return False
        if mtime is not None and row.mtime_us is not None:
            if mtime_micros(mtime) != row.mtime_us:
                return False
            if size is not None and row.size is not None:
                return True
        # In doubt: hash the bytes.
        return digest is not None and row.image_id is not None and digest() == row.image_id



def load_state(fs, files: list[str], run: RunMetadata, display) -> ResumeState:
    """The current row of each image in ``files`` (paths on ``fs``); refuse files made by other models.

    ``display(path)`` spells a path for the user.
    """
    state = ResumeState(ocr_revision=run.ocr_revision)
    ranks = row_rule.rank_files(files)
    state.files = sorted(ranks, key=ranks.get)
    tables = []
    for path in files:
        state.run = check_file(fs, path, run, display)
        table = _read_state_columns(fs, path)
        keys = row_rule.key_table(table["uri"], table["processed_at"], ranks[path])
        for name in ("status", "error_kind", "image_id", "bytes", "source_mtime", "ocr_revision"):
            keys = keys.append_column(name, table[name])
        tables.append(keys)
    if not tables:
        return state
    current = row_rule.newest_rows(pa.concat_tables(tables))
    seconds = current["processed_at"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy() / 1e6
    mtimes = current["source_mtime"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    for uri, status, kind, image_id, size, when, mtime_us, rank, position, ocr in zip(
        current["uri"].to_pylist(), current["status"].to_pylist(), current["error_kind"].to_pylist(),
        current["image_id"].to_pylist(), current["bytes"].to_pylist(), seconds.tolist(), mtimes,
        current[row_rule.FILE].to_pylist(), current[row_rule.ROW].to_pylist(), current["ocr_revision"].to_pylist(),
    ):
        gone = row_rule.is_gone(status)
        ok = status == STATUS_OK or (gone and kind is None)  # a gone row keeps the error_kind of the row it copied
        permanent = not ok and not gone and kind in PERMANENT_ERROR_KINDS
        state.current[uri] = RowState(ok, permanent, size, when, mtime_us, image_id, gone, rank, position, ocr)
    return state


def _read_state_columns(fs, path: str) -> pa.Table:
    """The resume columns of one file, as current-version rows (source_mtime null where the file predates it)."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        table = parquet.read(columns=[name for name in _STATE_COLUMNS if name in names])
    table = upgrade_table(table)
    # A column whose anchor is not among these (ocr_revision follows ocr_model) is not added by the
    # upgrade: null, as the upgrade would make it.
    schema = output_schema(None)
    for name in _STATE_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table


def check_file(fs, path: str, run: RunMetadata, display) -> RunMetadata:
    """The run metadata of one output file, after checking its schema and that ``run`` used the same models."""
    try:
        schema = pq.read_schema(path, filesystem=fs)
        existing = check_schema(schema, where=display(path))
    except SchemaMismatch as exc:
        raise OutputError(f"{exc}. Pass --overwrite to replace it, or choose another --out.") from exc
    except pa.ArrowInvalid as exc:
        raise OutputError(
            f"{display(path)} is not a readable Parquet file ({exc}). "
            "Pass --overwrite to replace it, or choose another --out."
        ) from exc
    if existing.models_signature() != run.models_signature():
        raise OutputError(
            f"{display(path)} was made with {_describe_signature(existing)}; this run uses "
            f"{_describe_signature(run)}. Pass --overwrite to replace it, or choose another --out."
        )
    return existing


def _describe_signature(run: RunMetadata) -> str:
    return (
        f"caption_model={run.caption_model}@{run.caption_revision}, "
        f"embed_model={run.embed_model}@{run.embed_revision}, probe set {run.probe_set_hash[:12]}"
    )
