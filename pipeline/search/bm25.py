"""The BM25 index over captions, probe answers and OCR text: built by DuckDB's fts, updated in place by us.

DuckDB's fts extension only has ``PRAGMA create_fts_index``, which rebuilds
the index over every row (18.7 s at 1M rows, most of an update's time before
this module). Its index is plain tables in the schema ``fts_main_docs``:

  docs (docid, name, len)        one row per document; name = our id, len = its term count
  terms (docid, fieldid, termid) one row per term occurrence
  dict (termid, term, df)        one row per term; df = documents holding it
  stats (num_docs, avgdl)        what the BM25 formula reads

and its ``match_bm25`` macro scores a query from exactly those tables (the
docid and termid values only join them). :func:`update` keeps the tables as a
fresh ``create_fts_index`` over the same documents would leave them, but for
which docid/termid each row got: a removed document's terms go and its terms'
df drop, a new document is tokenised by the index's own ``tokenize`` macro,
stopword list and stemmer (the same steps as the extension's build,
:data:`_TERMS_SQL`), new terms get new termids, and the stats are recounted.
So the stored macro gives every document the same score as after a full
rebuild, in time proportional to the documents changed
(tests/test_search_bm25.py compares the tables and the rankings).
"""

from __future__ import annotations

from pipeline.search.contract import DOCS, FTS_SCHEMA

STEMMER = "porter"  # create_fts_index's default, which the build uses

# The text of a searchable row: its caption, its short caption, every probe answer and the text read
# in the image (OCR). caption_short and text are schema v5's: null in upgraded older rows, which
# concat_ws skips. The OCR column is qualified: the documents' own column is named text too.
DOC_TEXT = (
    "concat_ws(' ', caption, caption_short, array_to_string(list_transform(probes, lambda p: p.answer), ' '), "
    "image_rows.text)"
)

# fts's own indexing steps (extension fts_indexing.cpp, create_fts_index): split with the index's
# tokenize macro, drop empty tokens and stopwords (before stemming), stem.
_TERMS_SQL = f"""
    SELECT d.docid, 0::BIGINT AS fieldid, stem(t.w, '{STEMMER}') AS term
    FROM (SELECT docid, unnest({FTS_SCHEMA}.tokenize(text)) AS w FROM _bm25_new) AS t
    JOIN _bm25_new AS d USING (docid)
    WHERE t.w IS NOT NULL AND len(t.w) > 0 AND t.w NOT IN (SELECT sw FROM {FTS_SCHEMA}.stopwords)
"""


def build(con) -> None:
    """The docs table (searchable rows of image_rows) and a fresh fts index over it."""
    con.execute(f"CREATE TABLE {DOCS} AS SELECT id, {DOC_TEXT} AS text FROM image_rows WHERE status = 'ok'")
    con.execute(f"PRAGMA create_fts_index('{DOCS}', 'id', 'text', overwrite = 1)")


def update(con, removed_ids: str, added_ids: str) -> None:
    """Drop the documents of the ids in table ``removed_ids`` and index image_rows' rows of ``added_ids``.

    Both are names of tables with an ``id`` column (an id in both is
    replaced). Only searchable (status ok) rows of ``added_ids`` become
    documents, as in :func:`build`.
    """
    fts = FTS_SCHEMA
    con.execute(f"DELETE FROM {DOCS} WHERE id IN (SELECT id FROM {removed_ids})")
    con.execute(f"""
        CREATE TEMP TABLE _bm25_gone AS
        SELECT docid FROM {fts}.docs WHERE name IN (SELECT id FROM {removed_ids})
    """)
    # df of the removed documents' terms goes down by one per document holding them.
    con.execute(f"""
        CREATE TEMP TABLE _bm25_minus AS
        SELECT termid, count(DISTINCT docid) AS n FROM {fts}.terms
        WHERE docid IN (SELECT docid FROM _bm25_gone) GROUP BY termid
    """)
    con.execute(f"DELETE FROM {fts}.terms WHERE docid IN (SELECT docid FROM _bm25_gone)")
    con.execute(f"DELETE FROM {fts}.docs WHERE docid IN (SELECT docid FROM _bm25_gone)")
    con.execute(f"UPDATE {fts}.dict AS d SET df = d.df - m.n FROM _bm25_minus AS m WHERE d.termid = m.termid")
    con.execute(f"DELETE FROM {fts}.dict WHERE df <= 0")  # a fresh build has no term without a document

    # The new documents, numbered after the highest docid.
    con.execute(f"""
        CREATE TEMP TABLE _bm25_new AS
        SELECT (SELECT coalesce(max(docid), -1) FROM {fts}.docs) + row_number() OVER (ORDER BY id) AS docid,
               id, {DOC_TEXT} AS text
        FROM image_rows WHERE status = 'ok' AND id IN (SELECT id FROM {added_ids})
    """)
    con.execute(f"INSERT INTO {DOCS} SELECT id, text FROM _bm25_new ORDER BY id")
    con.execute(f"CREATE TEMP TABLE _bm25_terms AS {_TERMS_SQL}")
    con.execute(f"""
        INSERT INTO {fts}.dict
        SELECT (SELECT coalesce(max(termid), -1) FROM {fts}.dict) + row_number() OVER (ORDER BY term), term, 0
        FROM (SELECT DISTINCT term FROM _bm25_terms WHERE term NOT IN (SELECT term FROM {fts}.dict))
    """)
    con.execute("""
        CREATE TEMP TABLE _bm25_plus AS
        SELECT term, count(DISTINCT docid) AS n FROM _bm25_terms GROUP BY term
    """)
    con.execute(f"UPDATE {fts}.dict AS d SET df = d.df + p.n FROM _bm25_plus AS p WHERE d.term = p.term")
    con.execute(f"""
        INSERT INTO {fts}.terms
        SELECT t.docid, t.fieldid, d.termid FROM _bm25_terms AS t JOIN {fts}.dict AS d USING (term)
        ORDER BY t.docid
    """)
    con.execute(f"""
        INSERT INTO {fts}.docs
        SELECT n.docid, n.id, coalesce(c.len, 0) FROM _bm25_new AS n
        LEFT JOIN (SELECT docid, count(*) AS len FROM _bm25_terms GROUP BY docid) AS c USING (docid)
        ORDER BY n.docid
    """)
    con.execute(f"DELETE FROM {fts}.stats")
    con.execute(f"INSERT INTO {fts}.stats SELECT count(docid), sum(len) / count(len) FROM {fts}.docs")
    for table in ("_bm25_gone", "_bm25_minus", "_bm25_new", "_bm25_terms", "_bm25_plus"):
        con.execute(f"DROP TABLE {table}")
