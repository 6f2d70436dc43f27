"""The rows an export writes: read from a search index, or from captioner Parquet through one.

Both sources are an index, opened read-only through ImageIndex, so they share
the index's names (``image_rows``, the ``images`` view, the ``probe_answer`` /
``probe_bool`` macros: pipeline.search.contract), its current-row rule
(pipeline.rows, as the index builder applies it) and its lockdown; ``--where``
and ``--probe`` mean exactly what they mean for ``captioner search``
(pipeline.search.filters builds the condition).

  * ``--index index.duckdb``: that index.
  * ``--from captions.parquet`` (a file, a part-file folder, local or on a
    bucket): the output's data files as pipeline.output lists them, built by
    the index builder into a rows-only index (no embeddings, BM25 or HNSW,
    which no export needs) in a temporary folder that is removed when the
    rows are closed. DuckDB reads local files in place, column by column;
    files on a bucket are first copied there one row group at a time, without
    their embeddings.

Rows come back in uri order, in pages, so an export never holds every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from pipeline.export.errors import ExportError

STATUSES = ("ok", "error", "any")
PAGE_ROWS = 2_000
# What exports read; the embedding is left out on purpose (wide, unused).
_COLUMNS = (
    "id", "uri", "status", "error", "caption", "probes", "width", "height", "format", "bytes",
    "image_id", "caption_model", "caption_revision", "caption_short", "text",
)  # fmt: skip


@dataclass(frozen=True)
class ProbeAnswer:
    question: str
    answer: str | None
    answer_bool: bool | None
    yes_prob: float | None = None  # schema v2 probes carry P(yes); v1 has none


@dataclass(frozen=True)
class ExportRow:
    id: int
    uri: str
    status: str
    error: str | None
    caption: str | None
    probes: tuple[ProbeAnswer, ...]
    width: int | None
    height: int | None
    format: str | None
    bytes: int | None
    image_id: str | None
    caption_model: str | None
    caption_revision: str | None
    # Schema v5 (null in rows upgraded from older files): the short caption, the text OCR read.
    caption_short: str | None = None
    text: str | None = None

    @property
    def generator(self) -> str | None:
        """The captioning model as ``id@revision``: who wrote the words."""
        if not self.caption_model:
            return None
        return f"{self.caption_model}@{self.caption_revision}" if self.caption_revision else self.caption_model

    @property
    def alt_caption(self) -> str | None:
        """What alt text starts from: the short caption when the run wrote two lengths."""
        return self.caption_short or self.caption

    def answer(self, question: str) -> ProbeAnswer | None:
        return next((p for p in self.probes if p.question == question), None)


@dataclass(frozen=True)
class Selection:
    """Which rows to export: the same filters as ``captioner search``, plus status."""

    where: str | None = None
    probes: tuple[str, ...] = ()
    status: str = "ok"

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ExportError(f"--status {self.status!r}: use one of {', '.join(STATUSES)}")


@dataclass
class RowSource:
    """Selected rows of an index or a Parquet output; close() when done."""

    description: str
    questions: tuple[str, ...]
    _query: Callable[[str, list], list[tuple]]
    _close: Callable[[], None]
    _condition: str = "TRUE"  # a SQL condition on image_rows, built from constants only
    has_yes_prob: bool = False
    sources: tuple[str, ...] = ()  # the captioner outputs the rows come from (the index's sources, or --from)

    def count(self) -> int:
        return int(self._query(f"SELECT count(*) FROM image_rows WHERE {self._condition}", [])[0][0])

    def total(self) -> int:
        """Rows in the source, selected or not."""
        return int(self._query("SELECT count(*) FROM image_rows", [])[0][0])

    def tree_uris(self) -> list[str]:
        """Every uri of the source, selected or not: what the mirrored tree's default root is computed from."""
        return [r[0] for r in self._query("SELECT uri FROM image_rows", [])]

    def image_ids(self) -> set[str]:
        """Every image_id of the source, selected or not (what human labels are joined on)."""
        return {r[0] for r in self._query("SELECT DISTINCT image_id FROM image_rows WHERE image_id IS NOT NULL", [])}

    def uris(self) -> list[str]:
        return [r[0] for r in self._query(f"SELECT uri FROM image_rows WHERE {self._condition} ORDER BY id", [])]

    def rows(self, page: int = PAGE_ROWS) -> Iterator[ExportRow]:
        """Every selected row in uri order, fetched ``page`` rows at a time (keyset paging on id)."""
        last = -1
        columns = ", ".join(_COLUMNS)  # constant names, not user input
        while True:
            batch = self._query(
                f"SELECT {columns} FROM image_rows WHERE id > ? AND {self._condition} ORDER BY id LIMIT {int(page)}",
                [last],
            )
            for values in batch:
                yield _row(dict(zip(_COLUMNS, values)))
            if len(batch) < page:
                return
            last = batch[-1][0]

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_rows(*, index=None, parquet=None, selection: Selection = Selection(), storage_options=None) -> RowSource:
    """The rows of ``index`` (a DuckDB index path) or ``parquet`` (a captioner output) that ``selection`` keeps."""
    from pipeline.search.errors import SearchError
    from pipeline.search.filters import filter_sql

    if (index is None) == (parquet is None):
        raise ExportError("read rows from either --index INDEX.duckdb or --from CAPTIONS.parquet, not both")
    source = _open_index(index) if index is not None else _open_parquet(parquet, storage_options)
    try:
        cond, params = filter_sql(selection.where, selection.probes, source.questions)
    except SearchError as exc:
        source.close()
        raise ExportError(str(exc)) from exc
    if selection.status != "any":
        cond = f"({cond}) AND status = ?"
        params = [*params, selection.status]
    try:
        # The filters run once, here (a bad --where fails before anything is
        # written); paging then reads the selected ids, not the filters again.
        source._query(f"CREATE TEMP TABLE export_selection AS SELECT id FROM image_rows WHERE {cond}", params)
    except ExportError:
        source.close()
        raise
    source._condition = "id IN (SELECT id FROM export_selection)"
    return source


def _open_index(path, *, description: str | None = None, cleanup: Callable[[], None] | None = None,
                sources: tuple[str, ...] | None = None) -> RowSource:
    from pipeline.search import ImageIndex, SearchError

    try:
        idx = ImageIndex.open(path)
    except BaseException as exc:
        if cleanup:
            cleanup()
        if isinstance(exc, SearchError):
            raise ExportError(str(exc)) from exc
        raise

    def query(sql: str, params: list) -> list[tuple]:
        try:
            return idx.sql(sql, params).rows
        except SearchError as exc:
            raise ExportError(str(exc)) from exc

    def close() -> None:
        try:
            idx.close()
        finally:
            if cleanup:
                cleanup()

    try:
        has_yes_prob = idx.has_yes_prob()
    except BaseException:
        close()
        raise
    return RowSource(description or f"index {path}", tuple(idx.info.probes), query, close, has_yes_prob=has_yes_prob,
                     sources=tuple(idx.info.sources) if sources is None else sources)


def _open_parquet(output: str, storage_options) -> RowSource:
    """A rows-only index of ``output`` in a temporary folder, opened as ``--index`` opens one."""
    import shutil
    import tempfile

    from pipeline.output import OutputStore
    from pipeline.search import SearchError
    from pipeline.search.index import build_index

    output = str(output)
    try:
        store = OutputStore(output, storage_options)
        files = store.data_files()
    except Exception as exc:  # fsspec backends raise their own types
        raise ExportError(f"cannot read {output}: {exc}; pass a captions.parquet file or part-file folder written by `captioner run`") from exc
    if not files:
        raise ExportError(f"no captioner Parquet at {output}; pass the --out of `captioner run` (a .parquet file or its folder)")
    folder = tempfile.mkdtemp(prefix="captioner-export-")

    def cleanup() -> None:
        shutil.rmtree(folder, ignore_errors=True)

    try:
        local = files if store.is_local else _local_copies(store, files, folder)
        db = f"{folder}/rows.duckdb"
        # The builder, not a reader of our own: one current-row rule and one
        # layout for both sources. An output holds one probe set; mixed_probes
        # leaves judging a hand-assembled folder to `captioner index`.
        build_index(local, db, rows_only=True, fresh=True, mixed_probes=True)
    except SearchError as exc:
        cleanup()
        raise ExportError(f"{exc}" if store.is_local else f"{output}: {exc}") from exc
    except BaseException:
        cleanup()
        raise
    return _open_index(db, description=f"Parquet {output}", cleanup=cleanup, sources=(output,))


def _local_copies(store, files: list[str], folder: str) -> list[str]:
    """Copies of a bucket output's data files in ``folder``, without their embeddings, in the same path order.

    Each file is checked against the schema first (errors name the bucket
    file), then copied one row group at a time with the embedding column
    written as nulls, so the copy still passes the check the index builder
    makes. Names keep the files' path order, which the current-row rule
    breaks ties on (pipeline.rows).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import SchemaMismatch, check_schema
    from schemas.base import EMBEDDING

    copies = []
    for rank, path in enumerate(sorted(files)):
        where = store.fs.unstrip_protocol(path)
        target = f"{folder}/{rank:08d}.parquet"
        try:
            with store.fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                check_schema(schema, where=where)
                wanted = [name for name in schema.names if name != EMBEDDING]
                embedding = schema.field(EMBEDDING)
                with pq.ParquetWriter(target, schema) as writer:
                    for group in range(parquet.num_row_groups):
                        table = parquet.read_row_group(group, columns=wanted)
                        nulls = pa.nulls(table.num_rows, embedding.type)
                        columns = [nulls if name == EMBEDDING else table[name] for name in schema.names]
                        writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        except SchemaMismatch as exc:
            raise ExportError(f"{exc}; re-run `captioner run` to rewrite it") from exc
        except (pa.ArrowException, OSError) as exc:
            raise ExportError(f"{where} is not a readable Parquet file: {exc}") from exc
        copies.append(target)
    return copies


def _row(values: dict) -> ExportRow:
    probes = tuple(
        ProbeAnswer(p["question"], p.get("answer"), p.get("answer_bool"), p.get("yes_prob"))
        for p in values.pop("probes") or ()
    )
    return ExportRow(probes=probes, **values)
