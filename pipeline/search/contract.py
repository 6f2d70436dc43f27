"""The search index's contract: what a captioner index database is.

Two sides use it. ``pipeline.search.index`` *builds* an index (``captioner
index``, and the temporary index behind ``captioner export --from``); the
*query* side opens one read-only: ``pipeline.search.image_index.ImageIndex``
(``captioner search / sql / duplicates``), through it the web page
(``pipeline.serve.service``) and the exports (``pipeline.export.rows``).
Everything both sides must agree on lives here and nowhere else:

  INDEX_FORMAT        bumped when the layout below changes; a reader refuses other formats
  table/view names    IMAGE_ROWS, SOURCE_KEYS, VECTOR_SLOTS, ANN_CENTROIDS, DOCS (+ FTS_SCHEMA), IMAGES, INDEX_META
  vector_path         where the vector file the catalogue points at lies (pipeline.search.vectors)
  ROW_COLUMNS         what image_rows has besides the schema's columns (minus the embedding)
  PROBE_MACROS        probe_answer / probe_bool / probe_yes_prob, for --where and SQL
  IndexInfo           the facts stored in index_meta (write_info / read_info)
  check_versions      refuse an index of another format or schema version
  attach_read_only    a connection that cannot write the file
  lock_down           no file access, configuration locked: user SQL may run after it
  has_yes_prob / yes_prob_filled / probes_type_has_yes_prob
                      feature checks: what this index's rows carry

Layout of an index database (all names fixed, nothing derived from user text):

  image_rows   one row per uri (all statuses), without the embedding: the
               current row (pipeline.rows) with, when it is ok, the newest
               caption/probes and the newest embedding model columns of the
               same bytes from any source file; ``id`` is ours,
               ``source_file`` / ``source_row`` say where the row came from,
               ``embedding_source_file`` / ``_row`` where its embedding did,
               ``caption_source_file`` / ``_row`` where its caption did.
  source_keys  (uri, image_id, status, processed_at, captioned, embedded,
               source_file, source_row) for every row of every source file:
               what an update needs to re-derive a uri's row
               (pipeline.search.catalogue_update) without reading old files.
  vector_slots (id, slot, norm, list) for status='ok' rows that have an
               embedding: the row ``slot`` of the vector file holds it (raw
               float32, split in two halves), ``norm`` its L2 norm, ``list`` its
               IVF list (null without ANN). The vector file itself
               (pipeline.search.vectors: header, then the high halves; the low
               halves in a second file named after it) lies beside the
               database under the name ``IndexInfo.vector_file``; ``IndexInfo.vector_slots`` is
               how many of its rows this catalogue covers. DuckDB is the
               catalogue; the vectors are scanned by pipeline.search.scan.
  ann_centroids (list, centroid FLOAT[D]) when the index has IVF lists.
  docs         (id, text) for status='ok' rows: captions, probe answers and the
               text read in the image (OCR), with a BM25 full-text index (schema
               ``fts_main_docs``), built by DuckDB's fts and updated in place
               (pipeline.search.bm25).
  images       a view: image_rows in schema column order (embedding null),
               plus id / source_file / source_row. A reader with vectors
               shadows it with a TEMP view of the same columns whose
               embedding comes from the vector file (and adds a TEMP view
               ``embeddings`` (id, embedding)). This is what ``--where`` and
               ``captioner sql`` see.
  index_meta   key -> JSON value: the facts in :class:`IndexInfo`.

A *rows-only* index (``IndexInfo.rows_only``, what ``export --from`` builds)
has image_rows, images (with a null embedding), the macros and index_meta,
but no vectors or docs: it answers SQL, not searches.

Publishing an update: the vector file is written (new name) or appended to
(after its committed rows) first, then the catalogue is renamed into place;
the catalogue names the vector file and its slot count, so a reader sees the
old generation or the new one, never a mix.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import duckdb

from pipeline.search.errors import SearchError
from pipeline.search.extensions import CONNECT_CONFIG, load_extensions

# 2: vectors in a vector file beside the catalogue (vector_slots, ann_centroids); no HNSW.
# 3: source_keys and image_rows.caption_source_file/_row, so an update re-derives only the rows that changed.
# 4: the vector file holds each float32 split in a high and a low half (pipeline.search.vectors format 2).
INDEX_FORMAT = 4

IMAGE_ROWS = "image_rows"
SOURCE_KEYS = "source_keys"
VECTOR_SLOTS = "vector_slots"
ANN_CENTROIDS = "ann_centroids"
EMBEDDINGS = "embeddings"  # the TEMP view (id, embedding) a reader adds over the vector file
VECTOR_ARROW = "_vector_file"  # the Arrow table (id, slot) that view reads
EMBEDDING_FUNCTION = "captioner_embedding"  # slot -> FLOAT[D], joined from the vector files (that view calls it)
DOCS = "docs"
FTS_SCHEMA = "fts_main_docs"
IMAGES = "images"
# A reader ATTACHes the index file under this name (attach_read_only); the stored images view,
# which a reader with vectors shadows with a TEMP one, is then this:
ATTACHED = "idx"
STORED_IMAGES = f"{ATTACHED}.main.{IMAGES}"
INDEX_META = "index_meta"

# image_rows: the schema's columns but the embedding, then these.
ROW_COLUMNS = ("id", "source_file", "source_row", "embedding_source_file", "embedding_source_row",
               "caption_source_file", "caption_source_row")
# The images view: the schema's columns (embedding included), then these.
VIEW_COLUMNS = ("id", "source_file", "source_row")

# Helpers for --where / captioner sql: the answer to one probe question.
PROBE_MACROS = (
    "CREATE MACRO probe_answer(probes, q) AS list_filter(probes, lambda p: p.question = q)[1].answer",
    "CREATE MACRO probe_bool(probes, q) AS list_filter(probes, lambda p: p.question = q)[1].answer_bool",
    "CREATE MACRO probe_yes_prob(probes, q) AS list_filter(probes, lambda p: p.question = q)[1].yes_prob",
)

# yes_prob: the probability of "yes" a schema may carry per probe answer. Only
# a floating-point field counts; any other type is ignored.
_YES_PROB = re.compile(r'(?:^|[(,]\s*)"?yes_prob"?\s+(FLOAT|DOUBLE|REAL|FLOAT4|FLOAT8)\b', re.IGNORECASE)


@dataclass(frozen=True)
class IndexInfo:
    """What an index was built from; stored in ``index_meta``."""

    index_format: int
    schema_version: int
    embed_model: str | None
    embed_revision: str | None
    embedding_dim: int | None
    probes: tuple[str, ...]
    sources: tuple[str, ...]
    files: tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns): the rebuild fingerprint
    rows: int
    searchable_rows: int
    embedded_rows: int
    vector_file: str | None = None  # the vector file's name, beside the database
    vector_slots: int = 0  # rows of the vector file this catalogue covers (live + dead)
    ann_lists: int | None = None  # IVF lists (None: exact scans only)
    ann_trained_rows: int = 0  # live vectors when the IVF centroids were trained
    built_at: str = ""
    duckdb_version: str = field(default=duckdb.__version__)
    rows_only: bool = False  # built without vectors and docs (export --from)

    @property
    def ann(self) -> bool:
        return bool(self.ann_lists)

    def to_meta_rows(self) -> list[tuple[str, str]]:
        return [(key, json.dumps(value)) for key, value in asdict(self).items()]

    @classmethod
    def from_meta_rows(cls, rows) -> "IndexInfo":
        data = {key: json.loads(value) for key, value in rows}
        known = cls.__dataclass_fields__
        missing = [
            k for k, f in known.items() if k not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise SearchError(f"the index metadata lacks {missing}; rebuild it with `captioner index --fresh`")
        data["probes"] = tuple(data.get("probes", ()))
        data["sources"] = tuple(data.get("sources", ()))
        data["files"] = tuple(tuple(f) for f in data.get("files", ()))
        return cls(**{k: v for k, v in data.items() if k in known})


def write_info(con: duckdb.DuckDBPyConnection, info: IndexInfo) -> None:
    con.execute(f"CREATE TABLE {INDEX_META} (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
    con.executemany(f"INSERT INTO {INDEX_META} VALUES (?, ?)", info.to_meta_rows())


def read_info(con: duckdb.DuckDBPyConnection, where: str = "the index") -> IndexInfo:
    try:
        rows = con.execute(f"SELECT key, value FROM {INDEX_META}").fetchall()
    except duckdb.CatalogException as exc:
        raise SearchError(
            f"{where} is not a captioner search index (no {INDEX_META} table); "
            f"build one with `captioner index PARQUET... --db PATH`"
        ) from exc
    return IndexInfo.from_meta_rows(rows)


def check_versions(info: IndexInfo, path) -> None:
    """Refuse an index this captioner cannot read: another index format or schema version."""
    from schemas import SCHEMA_VERSION

    if info.index_format != INDEX_FORMAT:
        raise SearchError(
            f"{path} is an index of format {info.index_format}; this captioner reads format {INDEX_FORMAT}. "
            f"Rebuild it with `captioner index --fresh --db {path} PARQUET...`"
        )
    if info.schema_version != SCHEMA_VERSION:
        raise SearchError(
            f"{path} holds schema v{info.schema_version} tables; this captioner searches v{SCHEMA_VERSION} indexes. "
            f"Rebuild it (from v1 or v2 output alike) with `captioner index --fresh --db {path} PARQUET...`"
        )


def vector_path(db_path, info: IndexInfo) -> Path | None:
    """The vector file of the index at ``db_path`` (None when it has none)."""
    return Path(db_path).with_name(info.vector_file) if info.vector_file else None


def add_macros(con: duckdb.DuckDBPyConnection) -> None:
    for macro in PROBE_MACROS:
        con.execute(macro)


def attach_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    """A connection to the index at ``path`` that cannot write it; call :func:`lock_down` before user SQL.

    Each index gets its own in-memory DuckDB instance with the file ATTACHed
    read-only: settings then apply to this index alone (DuckDB shares one
    instance per file path otherwise). The fts extension is loaded first, so
    the BM25 macros bind.
    """
    con = duckdb.connect(":memory:", config=CONNECT_CONFIG)
    try:
        load_extensions(con)
        literal = "'" + str(path).replace("'", "''") + "'"  # ATTACH takes no parameters
        con.execute(f"ATTACH {literal} AS {ATTACHED} (READ_ONLY)")
        con.execute(f"USE {ATTACHED}")
        con.execute("DETACH memory")  # nothing writable is left, apart from TEMP objects
    except BaseException:
        con.close()
        raise
    return con


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """From here on: no file access (COPY TO, ATTACH, read_csv ...) and no changing that back.

    The last step before a connection runs SQL a user wrote (--where,
    ``captioner sql``); settings the reader needs go before it.
    """
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


# -- feature checks: what this index's rows carry ------------------------------


def probes_type_has_yes_prob(probes_type: str) -> bool:
    """Whether a DuckDB type string for ``probes`` has a floating-point ``yes_prob`` field."""
    return bool(_YES_PROB.search(probes_type or ""))


def probes_type(con: duckdb.DuckDBPyConnection) -> str:
    """The DuckDB type of image_rows.probes, as text ('' when there is no such column)."""
    rows = con.execute(f"SELECT column_type FROM (DESCRIBE {IMAGE_ROWS}) WHERE column_name = 'probes'").fetchall()
    return str(rows[0][0]) if rows else ""


def has_yes_prob(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the index's probe answers have a yes_prob field (every schema v2 index; may be all null)."""
    return probes_type_has_yes_prob(probes_type(con))


def yes_prob_filled(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether any row has a yes_prob value (Moondream fills it; other backends leave it null)."""
    if not has_yes_prob(con):
        return False
    row = con.execute(
        f"SELECT EXISTS (SELECT 1 FROM {IMAGE_ROWS} WHERE len(list_filter(probes, p -> p.yes_prob IS NOT NULL)) > 0)"
    ).fetchone()
    return bool(row and row[0])
