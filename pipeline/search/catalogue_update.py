"""An index update in time proportional to what changed: the catalogue's rows, from the new files only.

A fresh build (pipeline.search.index._build) derives every uri's row from
every source row (pipeline.rows' newest-row rule, then the newest caption
and embedding of the same bytes). An update works on a copy of the previous
catalogue and re-derives only the *affected* uris: those with a row in a new
(or rewritten) source file, or with a row in a file that is gone or
rewritten. The choice needs every source row's keys, not its columns: the
``source_keys`` table (contract) keeps them (uri, image_id, status,
processed_at, whether it was captioned / embedded, file, row) for all rows.

The chosen rows' columns come from the new files (read whole: they are the
change) or from the previous row of the uri, which records where its base,
caption and embedding came from (``source_file``/``_row``,
``caption_source_file``/``_row``, ``embedding_source_file``/``_row``). When a
chosen row is in neither (an old, never-current row becomes current again:
say a file's earlier bytes come back through an older output), the update
gives up and the caller builds fresh; so the rows after an update are
exactly a fresh build's, except for ``id``: a kept uri keeps its id, a new
one gets the next free id (a fresh build numbers uris in uri order), so
ties between equal scores may come in another order.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.rows import sql_is_live, sql_is_newest
from pipeline.search import contract

# Which image_rows columns come from the caption's row and which from the embedding's (the fresh build's rule).
CAPTION_COLUMNS = ("caption", "caption_truncated", "probes", "caption_model", "caption_revision", "probe_set_hash")
EMBED_COLUMNS = ("embed_model", "embed_revision")
# A source row's keys: what the newest-row rule and the same-bytes rule read.
KEY_COLUMNS = ("uri", "image_id", "status", "processed_at")
KEYS_SELECT = ("uri, image_id, status, processed_at, caption_model IS NOT NULL AS captioned, "
               "embed_model IS NOT NULL AS embedded, source_file, source_row")


@dataclass(frozen=True)
class RowDelta:
    """Temp tables (each with an ``id`` column) an update leaves for the BM25 and vector steps."""

    removed: str  # ids whose previous row was replaced or dropped
    added: str  # ids of the rows written by this update
    dropped_slots: str  # ids whose vector slot no longer holds their embedding
    affected: int  # uris re-derived


def create_source_keys(con, sources_sql: str, params) -> None:
    """The keys of every source row (fresh build); ``sources_sql`` selects the source rows."""
    con.execute(f"CREATE TABLE {contract.SOURCE_KEYS} AS SELECT {KEYS_SELECT} FROM ({sources_sql})", params)


def update_rows(con, *, new_sql: str, new_params, new_files: list[str], gone_files: list[str],
                columns: list[str]) -> RowDelta | None:
    """Re-derive the affected uris' rows in image_rows; None when a chosen row is out of reach (build fresh).

    ``new_sql`` selects every row of ``new_files`` (the schema's ``columns``
    plus source_file/source_row); ``gone_files`` were indexed before and are
    gone or rewritten (their rows leave ``source_keys``).
    """
    keys = contract.SOURCE_KEYS
    con.execute(f"CREATE TEMP TABLE _new_src AS {new_sql}", new_params)
    con.execute(
        f"""CREATE TEMP TABLE _affected AS
            SELECT DISTINCT uri FROM _new_src
            UNION SELECT DISTINCT uri FROM {keys} WHERE source_file IN (SELECT unnest(?::VARCHAR[]))""",
        [gone_files],
    )
    con.execute(f"DELETE FROM {keys} WHERE source_file IN (SELECT unnest(?::VARCHAR[]))", [gone_files])
    con.execute(f"INSERT INTO {keys} SELECT {KEYS_SELECT} FROM _new_src")

    newest = sql_is_newest(file="source_file", row="source_row")
    con.execute(
        f"""CREATE TEMP TABLE _choice AS
        WITH k AS (SELECT * FROM {keys} WHERE uri IN (SELECT uri FROM _affected)),
        base AS (SELECT * FROM k QUALIFY {newest}),
        same_bytes AS (
            SELECT s.* FROM k AS s JOIN base AS b ON s.uri = b.uri AND s.image_id = b.image_id
            WHERE b.status = 'ok' AND s.status = 'ok'
        ),
        captioned AS (SELECT * FROM same_bytes WHERE captioned QUALIFY {newest}),
        embedded AS (SELECT * FROM same_bytes WHERE embedded QUALIFY {newest})
        SELECT b.uri, b.source_file AS b_file, b.source_row AS b_row,
               CASE WHEN c.uri IS NULL THEN b.source_file ELSE c.source_file END AS c_file,
               CASE WHEN c.uri IS NULL THEN b.source_row ELSE c.source_row END AS c_row,
               e.source_file AS e_file, e.source_row AS e_row,
               CASE WHEN e.uri IS NULL THEN b.source_file ELSE e.source_file END AS m_file,
               CASE WHEN e.uri IS NULL THEN b.source_row ELSE e.source_row END AS m_row
        FROM base AS b LEFT JOIN captioned AS c ON c.uri = b.uri LEFT JOIN embedded AS e ON e.uri = b.uri
        WHERE {sql_is_live("b.status")}"""
    )
    con.execute(f"CREATE TEMP TABLE _prev AS SELECT * FROM {contract.IMAGE_ROWS} WHERE uri IN (SELECT uri FROM _affected)")
    con.execute("CREATE TEMP TABLE _new_files AS SELECT unnest(?::VARCHAR[]) AS f", [new_files])
    # Each chosen row must be in a new file, or be where the previous row took that part from.
    prev_m_file = "coalesce(p.embedding_source_file, p.source_file)"
    prev_m_row = "CASE WHEN p.embedding_source_file IS NULL THEN p.source_row ELSE p.embedding_source_row END"
    unreachable = con.execute(
        f"""SELECT count(*) FROM _choice AS ch LEFT JOIN _prev AS p ON p.uri = ch.uri
        WHERE NOT (ch.b_file IN (SELECT f FROM _new_files) OR (p.source_file = ch.b_file AND p.source_row = ch.b_row))
           OR NOT (ch.c_file IN (SELECT f FROM _new_files)
                   OR (p.caption_source_file = ch.c_file AND p.caption_source_row = ch.c_row))
           OR NOT (ch.m_file IN (SELECT f FROM _new_files) OR ({prev_m_file} = ch.m_file AND {prev_m_row} = ch.m_row))"""
    ).fetchone()[0]
    if unreachable:
        return None

    def column(c: str) -> str:
        alias = "nc" if c in CAPTION_COLUMNS else "nm" if c in EMBED_COLUMNS else "nb"
        return f"CASE WHEN {alias}.source_file IS NOT NULL THEN {alias}.{c} ELSE p.{c} END AS {c}"

    max_id = con.execute(f"SELECT coalesce(max(id), -1) FROM {contract.IMAGE_ROWS}").fetchone()[0]
    con.execute(
        f"""CREATE TEMP TABLE _rows AS
        SELECT coalesce(p.id, {int(max_id)} + row_number() OVER (PARTITION BY p.id IS NULL ORDER BY ch.uri)) AS id,
               {", ".join(column(c) for c in columns)},
               ch.b_file AS source_file, ch.b_row AS source_row,
               ch.e_file AS embedding_source_file, ch.e_row AS embedding_source_row,
               ch.c_file AS caption_source_file, ch.c_row AS caption_source_row
        FROM _choice AS ch
        LEFT JOIN _prev AS p ON p.uri = ch.uri
        LEFT JOIN _new_src AS nb ON nb.source_file = ch.b_file AND nb.source_row = ch.b_row
        LEFT JOIN _new_src AS nc ON nc.source_file = ch.c_file AND nc.source_row = ch.c_row
        LEFT JOIN _new_src AS nm ON nm.source_file = ch.m_file AND nm.source_row = ch.m_row"""
    )
    # A slot keeps its vector only while the row is searchable and its embedding still comes from the same,
    # unchanged, file row.
    con.execute(
        """CREATE TEMP TABLE _dropped_slots AS SELECT p.id FROM _prev AS p LEFT JOIN _rows AS r ON r.id = p.id
        WHERE r.id IS NULL OR r.status <> 'ok'
           OR r.embedding_source_file IS DISTINCT FROM p.embedding_source_file
           OR r.embedding_source_row IS DISTINCT FROM p.embedding_source_row
           OR p.embedding_source_file IN (SELECT unnest(?::VARCHAR[]))""",
        [gone_files],
    )
    con.execute("CREATE TEMP TABLE _removed_ids AS SELECT id FROM _prev")
    con.execute("CREATE TEMP TABLE _added_ids AS SELECT id FROM _rows")
    con.execute(f"DELETE FROM {contract.IMAGE_ROWS} WHERE uri IN (SELECT uri FROM _affected)")
    con.execute(f"INSERT INTO {contract.IMAGE_ROWS} BY NAME SELECT * FROM _rows ORDER BY id")
    affected = con.execute("SELECT count(*) FROM _affected").fetchone()[0]
    for table in ("_new_src", "_choice", "_prev", "_new_files", "_rows", "_affected"):
        con.execute(f"DROP TABLE {table}")
    return RowDelta("_removed_ids", "_added_ids", "_dropped_slots", int(affected))
