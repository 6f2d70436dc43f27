"""BM25 updated in place (pipeline.search.bm25) leaves fts's tables, and so every score, as a fresh build does."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from pipeline.search import bm25
from pipeline.search.extensions import load_extensions

WORDS = ["the", "a", "Red", "red", "house", "houses", "running", "ran", "runs", "dog's", "café", "CAFE", "x42",
         "of", "and", "garden", "gardens", "42", "door", "doors", "don't", "—", "über", "sky", "skies", ""]


def texts(rng, n):
    return [" ".join(rng.choice(WORDS, rng.integers(0, 9))) for _ in range(n)]


def catalogue(rows):
    """A connection with an image_rows table of (id, status, caption, probes) rows (schema v5's caption_short
    and OCR text, which the documents also read, null)."""
    con = duckdb.connect()
    load_extensions(con)
    con.execute("CREATE TABLE image_rows (id BIGINT, status VARCHAR, caption VARCHAR, "
                "probes STRUCT(question VARCHAR, answer VARCHAR)[], caption_short VARCHAR, text VARCHAR)")
    con.executemany("INSERT INTO image_rows (id, status, caption, probes) VALUES (?, ?, ?, ?)", rows)
    return con


def rows_of(rng, ids):
    return [(int(i), "ok" if rng.random() > 0.1 else "error", caption,
             [{"question": "q", "answer": answer}]) for i, caption, answer in
            zip(ids, texts(rng, len(ids)), texts(rng, len(ids)))]


def state(con):
    """fts's tables with docid/termid resolved to our ids and terms (what scores depend on)."""
    f = "fts_main_docs"
    return {
        "docs": sorted(con.execute(f"SELECT name, len FROM {f}.docs").fetchall()),
        "terms": sorted(con.execute(
            f"SELECT d.name, t.fieldid, x.term FROM {f}.terms t JOIN {f}.docs d USING (docid) "
            f"JOIN {f}.dict x USING (termid)").fetchall()),
        "dict": sorted(con.execute(f"SELECT term, df FROM {f}.dict").fetchall()),
        "stats": con.execute(f"SELECT num_docs, avgdl FROM {f}.stats").fetchall(),
        "docs_table": sorted(con.execute("SELECT id, text FROM docs").fetchall()),
    }


def ranking(con, query):
    return con.execute("SELECT id, score FROM (SELECT id, fts_main_docs.match_bm25(id, ?) AS score FROM docs) "
                       "WHERE score IS NOT NULL ORDER BY score DESC, id", [query]).fetchall()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_update_in_place_equals_a_fresh_fts_build(seed):
    rng = np.random.default_rng(seed)
    old = rows_of(rng, range(300))
    replaced = rows_of(rng, rng.choice(300, 40, replace=False))  # same ids, new text (or now an error)
    removed = [int(i) for i in rng.choice(300, 25, replace=False) if i not in {r[0] for r in replaced}]
    added = rows_of(rng, range(300, 360))
    final = {r[0]: r for r in old}
    for r in replaced + added:
        final[r[0]] = r
    for i in removed:
        final.pop(i)

    fresh = catalogue(sorted(final.values()))
    bm25.build(fresh)

    updated = catalogue(old)
    bm25.build(updated)
    changed = [r[0] for r in replaced] + removed
    updated.execute("DELETE FROM image_rows WHERE id IN (SELECT unnest(?::BIGINT[]))", [changed])
    updated.executemany("INSERT INTO image_rows (id, status, caption, probes) VALUES (?, ?, ?, ?)", replaced + added)
    updated.execute("CREATE TEMP TABLE gone AS SELECT unnest(?::BIGINT[]) AS id", [changed])
    updated.execute("CREATE TEMP TABLE new AS SELECT unnest(?::BIGINT[]) AS id", [[r[0] for r in replaced + added]])
    bm25.update(updated, "gone", "new")

    assert state(updated) == state(fresh)
    for query in ["red house", "running dogs", "cafe garden", "skies door", "the", "über", "x"]:
        assert ranking(updated, query) == ranking(fresh, query)


def test_updating_with_nothing_changes_nothing():
    rng = np.random.default_rng(5)
    con = catalogue(rows_of(rng, range(50)))
    bm25.build(con)
    before = state(con)
    con.execute("CREATE TEMP TABLE none AS SELECT 1::BIGINT AS id WHERE false")
    bm25.update(con, "none", "none")
    assert state(con) == before
