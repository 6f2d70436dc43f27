"""`captioner index` after a run updates the catalogue in place (issue 16 item 4), and equals a fresh build.

Each step changes the sources the way runs do (new parts, replaced rows, an
embeddings-only output, files gone from the source, a removed or rewritten
part file), then the updated index is compared with a fresh build of the same
sources: every row (but its id), BM25 scores, exact vector hits.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.search import ImageIndex, build_index
from schemas import RunMetadata
from tests import rows
from tests.search_data import later, ok_row, run_metadata, write_rows

DIM = 8
RUN = run_metadata(dim=DIM)
EMBED_ONLY = RunMetadata(None, None, RUN.embed_model, RUN.embed_revision, DIM, "0" * 64)
WORDS = ["red", "house", "door", "garden", "dog", "running", "sky", "car", "blue", "tree", "window", "street"]
QUERIES = ["red house", "dog running", "blue sky tree", "window", "street car door"]


def vectors(n, seed):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def captioned(uris, seed, at):
    rng = np.random.default_rng(seed)
    return [ok_row(u, " ".join(rng.choice(WORDS, 5)), [str(rng.choice(["yes", "no"])), str(rng.choice(WORDS))], v,
                   run=RUN, at=at) for u, v in zip(uris, vectors(len(uris), seed))]


def uris(a, b):
    return [f"/img/{i:04d}.jpg" for i in range(a, b)]


def snapshot(db):
    with ImageIndex.open(db) as idx:
        table = idx.sql("SELECT * EXCLUDE (id) FROM image_rows ORDER BY uri")
        text = {q: sorted((round(-h.score, 9), h.uri) for h in idx.search_text(q, 500)) for q in QUERIES}
        semantic = [[(h.uri, round(h.score, 6)) for h in idx.search_vector(q, 10, exact=True)]
                    for q in vectors(5, 99)]
        return table.columns, table.rows, text, semantic, idx.info.rows, idx.info.embedded_rows


def check_against_fresh(src, db, tmp_path, *, updated=True):
    report = build_index([], db)
    assert report.rebuilt and report.updated == updated, report
    fresh = tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}.duckdb"
    build_index([src], fresh, fresh=True)
    assert snapshot(db) == snapshot(fresh)
    return report


@pytest.fixture
def collection(tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    write_rows(src / "part-0.parquet", captioned(uris(0, 200), 1, later(0)), RUN)
    db = tmp_path / "index.duckdb"
    build_index([src], db)
    return src, db


def test_new_and_replaced_rows_update_in_place(collection, tmp_path):
    src, db = collection
    # 30 new images and 10 re-captioned ones
    write_rows(src / "part-1.parquet", captioned(uris(200, 230) + uris(0, 10), 2, later(5)), RUN)
    report = check_against_fresh(src, db, tmp_path)
    assert report.vectors_read == 40 and "copy" in report.timings
    # an embeddings-only run over 5 of them keeps their captions, takes its embeddings
    write_rows(src / "part-2.parquet", [
        rows.row(u, run=EMBED_ONLY, at=later(9), image_id=f"{abs(hash(u)):064x}"[:64], bytes=1000, format="JPEG",
                 width=640, height=480, embedding=(v / np.linalg.norm(v)).tolist())
        for u, v in zip(uris(5, 10) + uris(220, 222), vectors(7, 3))
    ], EMBED_ONLY)
    check_against_fresh(src, db, tmp_path)
    # files that left the source (a gone row), one that broke (an error row)
    write_rows(src / "part-3.parquet", [
        rows.row(u, run=RUN, at=later(12), status="gone", image_id=f"{abs(hash(u)):064x}"[:64]) for u in uris(50, 53)
    ] + [rows.row(uris(60, 61)[0], run=RUN, at=later(12), status="error", error_kind="truncated", error="cut")], RUN)
    report = check_against_fresh(src, db, tmp_path)
    assert report.info.rows == 230 - 3


def test_a_rewritten_part_updates_in_place_and_a_removed_one_rebuilds(collection, tmp_path):
    src, db = collection
    write_rows(src / "part-1.parquet", captioned(uris(200, 230) + uris(0, 10), 2, later(5)), RUN)
    check_against_fresh(src, db, tmp_path)
    # the same part rewritten with fewer, other rows: its old rows leave (215-229 are gone), its new ones come in
    write_rows(src / "part-1.parquet", captioned(uris(200, 215) + uris(0, 10) + uris(20, 25), 4, later(6)), RUN)
    check_against_fresh(src, db, tmp_path)
    # removed: the rows it replaced come back from part-0, which the catalogue no longer holds: built fresh
    (src / "part-1.parquet").unlink()
    check_against_fresh(src, db, tmp_path, updated=False)


def test_captioner_index_says_the_catalogue_was_updated_in_place(collection):
    from tests.cli import cli

    src, db = collection
    write_rows(src / "part-1.parquet", captioned(uris(200, 205), 2, later(5)), RUN)
    out = cli("index", "--db", str(db)).output
    assert "catalogue: updated in place" in out and "5 read from Parquet" in out, out
