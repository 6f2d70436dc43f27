"""The rows an export writes: read from a search index or from captioner Parquet.

Both sources go through the same SQL over the same names (``image_rows``,
the ``images`` view, the ``probe_answer`` / ``probe_bool`` macros), so
``--where`` and ``--probe`` mean exactly what they mean for ``captioner
search`` (pipeline.search.filters builds the condition for both).

  * ``--index index.duckdb``: the index, opened read-only through ImageIndex.
  * ``--from captions.parquet`` (a file, a part-file folder, local or on a
    bucket): the output's data files as pipeline.output lists them, each
    checked against the schema, newest row per uri kept, in an in-memory
    DuckDB (without the embedding column, which no export needs).

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
    "image_id", "caption_model", "caption_revision",
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

    @property
    def generator(self) -> str | None:
        """The captioning model as ``id@revision``: who wrote the words."""
        if not self.caption_model:
            return None
        return f"{self.caption_model}@{self.caption_revision}" if self.caption_revision else self.caption_model

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

    def count(self) -> int:
        return int(self._query(f"SELECT count(*) FROM image_rows WHERE {self._condition}", [])[0][0])

    def total(self) -> int:
        """Rows in the source, selected or not."""
        return int(self._query("SELECT count(*) FROM image_rows", [])[0][0])

    def tree_uris(self) -> list[str]:
        """Every uri of the source, selected or not: what the mirrored tree's default root is computed from."""
        return [r[0] for r in self._query("SELECT uri FROM image_rows", [])]

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


def _open_index(path) -> RowSource:
    from pipeline.search import ImageIndex, SearchError

    try:
        idx = ImageIndex.open(path)
    except SearchError as exc:
        raise ExportError(str(exc)) from exc

    def query(sql: str, params: list) -> list[tuple]:
        try:
            return idx.sql(sql, params).rows
        except SearchError as exc:
            raise ExportError(str(exc)) from exc

    return RowSource(f"index {path}", tuple(idx.info.probes), query, idx.close, has_yes_prob=_index_has_yes_prob(idx))


def _index_has_yes_prob(idx) -> bool:
    result = idx.sql(
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'image_rows' AND column_name = 'probes'"
    )
    return bool(result.rows) and "yes_prob" in str(result.rows[0][0]).lower()


def _open_parquet(output: str, storage_options) -> RowSource:
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import rows as row_rule
    from pipeline.output import OutputStore
    from pipeline.search.index import PROBE_MACROS
    from schemas import SchemaMismatch, check_schema, upgrade_table

    output = str(output)
    try:
        store = OutputStore(output, storage_options)
        files = store.data_files()
    except Exception as exc:  # fsspec backends raise their own types
        raise ExportError(f"cannot read {output}: {exc}; pass a captions.parquet file or part-file folder written by `captioner run`") from exc
    if not files:
        raise ExportError(f"no captioner Parquet at {output}; pass the --out of `captioner run` (a .parquet file or its folder)")
    tables, questions = [], {}
    ranks = row_rule.rank_files(files)
    for path in files:
        where = path if store.is_local else store.fs.unstrip_protocol(path)
        try:
            schema = pq.read_schema(path, filesystem=store.fs)
            run = check_schema(schema, where=where)
        except SchemaMismatch as exc:
            raise ExportError(f"{exc}; re-run `captioner run` to rewrite it") from exc
        except (pa.ArrowException, OSError) as exc:
            raise ExportError(f"{where} is not a readable Parquet file: {exc}") from exc
        questions.update(dict.fromkeys(run.probes))
        wanted = [name for name in schema.names if name != "embedding"]
        # v1 files come up to the current schema here, the one place this reader normalises versions.
        rows = upgrade_table(pq.read_table(path, columns=wanted, filesystem=store.fs))
        keys = row_rule.key_table(rows[row_rule.URI], rows[row_rule.PROCESSED_AT], ranks[path])
        tables.append(pa.Table.from_arrays(
            [*rows.columns, keys[row_rule.FILE], keys[row_rule.ROW]],
            names=[*rows.column_names, row_rule.FILE, row_rule.ROW],
        ))  # fmt: skip
    # The one newest-row rule (pipeline/rows.py), as resume, the merge and the index apply it.
    table = row_rule.newest_rows(pa.concat_tables(tables, promote_options="permissive"))
    table = table.drop_columns([row_rule.FILE, row_rule.ROW])

    con = duckdb.connect(":memory:")
    try:
        con.register("parquet_rows", table)
        con.execute("CREATE TABLE image_rows AS SELECT row_number() OVER (ORDER BY uri) - 1 AS id, * FROM parquet_rows")
        con.unregister("parquet_rows")
        con.execute("CREATE VIEW images AS SELECT * FROM image_rows")
        for macro in PROBE_MACROS:
            con.execute(macro)
        # As on an index: --where cannot reach files.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise

    def query(sql: str, params: list) -> list[tuple]:
        try:
            return con.execute(sql, params).fetchall()
        except duckdb.Error as exc:
            raise ExportError(f"query failed: {str(exc).strip().splitlines()[0]}") from exc

    probe_type = table.schema.field("probes").type
    has_yes_prob = "yes_prob" in str(probe_type)
    return RowSource(f"Parquet {output}", tuple(questions), query, con.close, has_yes_prob=has_yes_prob)


def _row(values: dict) -> ExportRow:
    probes = tuple(
        ProbeAnswer(p["question"], p.get("answer"), p.get("answer_bool"), p.get("yes_prob"))
        for p in values.pop("probes") or ()
    )
    return ExportRow(probes=probes, **values)
