"""Resume: what an existing output already holds, and whether an image needs a new row.

Which row is current for an image is decided in one place, pipeline.rows.
Resume reads only key columns, which every schema version has, so files of
an older version (v1) stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import rows as row_rule
from pipeline.decode import PERMANENT_ERROR_KINDS
from pipeline.storage import OutputError
from schemas import STATUS_OK, RunMetadata, SchemaMismatch, check_schema

# Columns that decide resume; reading only these keeps a rerun's start cheap.
_STATE_COLUMNS = ["uri", "status", "error_kind", "bytes", "processed_at"]


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


def load_state(fs, files: list[str], run: RunMetadata, display) -> ResumeState:
    """The current row of each image in ``files`` (paths on ``fs``); refuse files made by other models.

    ``display(path)`` spells a path for the user.
    """
    state = ResumeState()
    ranks = row_rule.rank_files(files)
    tables = []
    for path in files:
        state.run = check_file(fs, path, run, display)
        table = pq.read_table(path, columns=_STATE_COLUMNS, filesystem=fs)
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
