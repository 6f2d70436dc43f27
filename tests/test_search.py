"""The DuckDB search layer on crafted Parquet: modes, fusion, filters, safety, re-indexing.

Vectors come from tests/search_doubles.py (a lookup-table TEST DOUBLE), so the
expected nearest images are known exactly; test_search_models.py runs the real
tiny open_clip model end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

import schemas
from pipeline.search import ImageIndex, SearchError, build_index
from pipeline.search.fusion import reciprocal_rank_fusion
from tests import search_doubles
from tests.search_data import (
    CAR,
    ERROR_URI,
    PERSON,
    QUOTE_CAPTION,
    crafted_rows,
    later,
    ok_row,
    run_metadata,
    write_rows,
)

search_doubles.register()
search_doubles.TEXT_VECTORS.update({"beach": [1, 0, 0, 0], "a dog": [0.8, 0.6, 0, 0]})
search_doubles.IMAGE_VECTORS.update({(255, 0, 0): [0.6, 0, 0.8, 0]})


def uris(hits):
    return [h.uri.rsplit("/", 1)[-1] for h in hits]


@pytest.fixture(scope="module")
def crafted_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    write_rows(folder / "part-0.parquet", crafted_rows(), run_metadata())
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["exact", "ann"])
def index(request, crafted_dir, tmp_path_factory):
    """The crafted index, once scanned exactly and once through IVF lists."""
    db = tmp_path_factory.mktemp("db") / "index.duckdb"
    build_index([crafted_dir], db, ann=request.param)
    with ImageIndex.open(db) as idx:
        yield idx


# -- modes ---------------------------------------------------------------------


def test_text_mode_ranks_by_bm25_over_captions_and_answers(index):
    assert uris(index.search_text("beach")) == ["people_beach.jpg", "dog_beach.jpg"]
    # "red" is in red_car's caption and its probe answer; only ok rows are searchable
    assert uris(index.search_text("red")) == ["red_car.jpg"]
    assert index.search_text("truncated") == []  # the error row's message is not indexed


def test_semantic_mode_ranks_by_cosine(index):
    hits = index.search_semantic("beach", k=5)
    assert uris(hits) == ["cat_sofa.jpg", "dog_beach.jpg", "red_car.jpg", "people_beach.jpg", "sign.jpg"]
    assert [round(h.score, 2) for h in hits] == [0.99, 0.8, 0.6, 0.4, 0.2]
    assert uris(index.search_semantic("a dog", k=1)) == ["dog_beach.jpg"]


def test_image_mode_ranks_by_similarity_to_the_query_image(index, tmp_path):
    from PIL import Image

    query = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(query)
    hits = index.search_image(query, k=2)
    assert uris(hits) == ["red_car.jpg", "cat_sofa.jpg"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_hybrid_order_equals_hand_computed_rrf(index):
    # text ranks: people 1, dog 2; semantic ranks: cat 1, dog 2, car 3, people 4, sign 5
    expected = {
        "dog_beach.jpg": 1 / 62 + 1 / 62,
        "people_beach.jpg": 1 / 61 + 1 / 64,
        "cat_sofa.jpg": 1 / 61,
        "red_car.jpg": 1 / 63,
        "sign.jpg": 1 / 65,
    }
    hits = index.search_hybrid("beach", k=5)
    assert uris(hits) == list(expected)
    assert [h.score for h in hits] == pytest.approx(list(expected.values()))
    assert (hits[0].text_rank, hits[0].semantic_rank) == (2, 2)
    assert uris(index.search("beach", k=5)) == list(expected)  # hybrid is the default mode


def test_rrf_by_hand():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], k_rrf=60)
    assert [item for item, _, _ in fused] == ["a", "c", "b"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][2] == (3, 1)


def test_search_dispatch_and_empty_queries(index, tmp_path):
    with pytest.raises(SearchError, match="QUERY"):
        index.search("", mode="hybrid")
    with pytest.raises(SearchError, match="--mode text"):
        index.search(image=tmp_path / "x.png", mode="text")
    with pytest.raises(SearchError, match="no such file"):
        index.search(image=tmp_path / "missing.png")


# -- filters -------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("text", ["people_beach.jpg"]),
        ("semantic", ["red_car.jpg", "people_beach.jpg"]),
        ("hybrid", ["people_beach.jpg", "red_car.jpg"]),  # people 1/61 + 1/62, car 1/61
    ],
)
def test_probe_filter_combines_with_every_mode(index, mode, expected):
    hits = index.search("beach", mode=mode, k=10, probes=[f"{PERSON}=yes"])
    assert uris(hits) == expected


def test_hybrid_evaluates_its_filter_once_for_both_lists(index, monkeypatch):
    """The filter's ids are read once and both ranked lists use them: a filter costs as much as a list (issue 16)."""
    from pipeline.search import image_index

    calls = []
    for name in ("filter_ids_sql", "filter_sql"):
        real = getattr(image_index, name)
        monkeypatch.setattr(image_index, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    hits = index.search_hybrid("beach", k=10, probes=[f"{PERSON}=yes"], where="width >= 1")
    assert uris(hits) == ["people_beach.jpg", "red_car.jpg"]
    assert calls == ["filter_ids_sql"]


@pytest.mark.parametrize("mode", ["text", "semantic", "hybrid"])
def test_where_filter_combines_with_every_mode(index, mode):
    hits = index.search("beach", mode=mode, k=10, where="uri LIKE '%dog%' AND width >= 640")
    assert uris(hits) == ["dog_beach.jpg"]


def test_filters_combine_with_image_mode(index, tmp_path):
    from PIL import Image

    query = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(query)
    hits = index.search_image(query, k=10, where="NOT probe_bool(probes, 'Is there a person?')")
    assert uris(hits) == ["cat_sofa.jpg", "dog_beach.jpg", "sign.jpg"]


def test_filtered_vector_search_is_exact_even_with_ann(index):
    # a filter must not cut the result short
    hits = index.search_semantic("beach", k=1, where="uri = '/img/sign.jpg'")
    assert uris(hits) == ["sign.jpg"]


def test_probe_filter_on_free_text_answers_is_case_insensitive(index):
    assert uris(index.search_semantic("beach", probes=[f"{CAR}= RED "])) == ["red_car.jpg"]
    assert uris(index.search_text("car", probes=[f"{PERSON.lower()}=no", f"{CAR}=no car"])) == ["sign.jpg"]


def test_unknown_probe_question_names_the_known_ones(index):
    with pytest.raises(SearchError, match="Is there a person"):
        index.search_text("beach", probes=["Is it raining?=yes"])
    with pytest.raises(SearchError, match="QUESTION=ANSWER"):
        index.search_text("beach", probes=["no equals sign"])


# -- safety ----------------------------------------------------------------------


HOSTILE = [
    QUOTE_CAPTION,
    "it's",
    "'; DROP TABLE docs; --",
    "\") OR 1=1 --",
    "beach' UNION SELECT id, 1e9 FROM image_rows --",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_quotes_and_sql_in_queries_are_just_text(index, query):
    for mode in ("text", "semantic", "hybrid"):
        index.search(query, mode=mode, k=3)
    assert index.sql("SELECT count(*) FROM images").rows == [(6,)]


def test_quoted_caption_is_found_by_its_words(index):
    assert uris(index.search_text(QUOTE_CAPTION, k=1)) == ["sign.jpg"]
    assert uris(index.search_text("drop table o'clock", k=1)) == ["sign.jpg"]


@pytest.mark.parametrize(
    "where",
    [
        "true; DROP TABLE images",
        "uri = 'x') OR (1=1",
        "true FROM image_rows",
        "1=1 UNION SELECT 2",
        "",
        "true /* unterminated",
    ],
)
def test_where_must_be_one_expression(index, where):
    with pytest.raises(SearchError, match="--where"):
        index.search_text("beach", where=where)


def test_where_comment_cannot_swallow_the_wrapper(index):
    assert uris(index.search_text("beach", where="uri LIKE '%dog%' -- trailing comment")) == ["dog_beach.jpg"]


def test_where_with_unknown_column_is_a_search_error(index):
    with pytest.raises(SearchError, match="no_such_column"):
        index.search_text("beach", where="no_such_column = 1")


def test_sql_is_read_only(index):
    assert index.sql("SELECT status, count(*) AS n FROM images GROUP BY ALL ORDER BY status").rows == [
        ("error", 1),
        ("ok", 5),
    ]
    for statement in [
        "DELETE FROM image_rows",
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW images",
        "COPY (SELECT 1) TO 'leak.csv'",
        "ATTACH 'other.duckdb' AS other",
        "SET enable_external_access = true",
        "SELECT * FROM read_csv('/etc/hostname')",
    ]:
        with pytest.raises(SearchError):
            index.sql(statement)
    with pytest.raises(SearchError, match="exactly one"):
        index.sql("SELECT 1; SELECT 2")
    assert index.sql("SELECT count(*) FROM docs").rows == [(5,)]  # still usable after errors


def test_error_rows_are_queryable_but_not_searchable(index):
    result = index.sql("SELECT uri, status, embedding FROM images WHERE status = 'error'")
    assert result.rows == [(ERROR_URI, "error", None)]
    assert ERROR_URI not in [h.uri for h in index.search_semantic("beach", k=100)]


def test_ann_index_has_lists_and_exact_one_has_none(index):
    # was: the HNSW plan test (the DuckDB HNSW path is gone; vectors are scanned from the vector file)
    assert index.vectors.ann == index.info.ann
    assert (index.info.ann_lists or 0) >= (1 if index.info.ann else 0)


# -- embedder checks -------------------------------------------------------------


class _OtherEmbedder(search_doubles.MapEmbedder):
    def __init__(self, model_id=search_doubles.SPEC, revision=search_doubles.REVISION, dim=search_doubles.DIM):
        self.model_id, self.revision, self.dim = model_id, revision, dim


@pytest.mark.parametrize(
    "embedder",
    [
        _OtherEmbedder(model_id="open_clip:ViT-B-32@openai"),
        _OtherEmbedder(revision="v2"),
        _OtherEmbedder(dim=8),
    ],
    ids=["model", "revision", "dim"],
)
def test_mismatched_embedder_is_refused(index, embedder):
    with pytest.raises(SearchError, match="not comparable"):
        ImageIndex.open(index.path, embedder=embedder)


def test_matching_embedder_can_be_injected(index):
    with ImageIndex.open(index.path, embedder=_OtherEmbedder()) as idx:
        assert uris(idx.search_semantic("beach", k=1)) == ["cat_sofa.jpg"]


def test_index_from_another_schema_version_is_refused(index, monkeypatch):
    built = schemas.SCHEMA_VERSION
    monkeypatch.setattr(schemas, "SCHEMA_VERSION", built + 1)
    with pytest.raises(SearchError, match=f"schema v{built} tables"):
        ImageIndex.open(index.path)


def test_mixing_embedders_in_one_index_is_refused(tmp_path):
    write_rows(tmp_path / "a.parquet", crafted_rows(), run_metadata())
    other = run_metadata(revision="v2")
    write_rows(tmp_path / "b.parquet", [ok_row("/img/x.jpg", "x", ["no", "no"], [1, 0, 0, 0], run=other)], other)
    with pytest.raises(SearchError, match="one index per embedder"):
        build_index([tmp_path], tmp_path / "index.duckdb")
    assert not (tmp_path / "index.duckdb").exists()


def test_non_captioner_parquet_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(SearchError, match="not written by captioner"):
        build_index([tmp_path / "other.parquet"], tmp_path / "index.duckdb")


def test_index_without_embeddings_supports_text_only(tmp_path):
    run = run_metadata(embed_model=None)
    rows = [ok_row("/img/a.jpg", "a cat on a beach", ["no", "no"], None, run=run)]
    write_rows(tmp_path / "a.parquet", rows, run)
    build_index([tmp_path / "a.parquet"], tmp_path / "index.duckdb")
    with ImageIndex.open(tmp_path / "index.duckdb") as idx:
        assert uris(idx.search("beach")) == ["a.jpg"]  # default mode falls back to text
        with pytest.raises(SearchError, match="--mode text"):
            idx.search("beach", mode="semantic")


# -- re-indexing -------------------------------------------------------------------


def test_reindex_picks_up_new_files_and_newer_rows(tmp_path):
    src, db = tmp_path / "out", tmp_path / "index.duckdb"
    src.mkdir()
    run = run_metadata()
    write_rows(src / "part-0.parquet", crafted_rows(run), run)
    first = build_index([src], db)
    assert (first.rebuilt, first.info.rows, first.info.ann) == (True, 6, False)
    assert build_index([], db).rebuilt is False  # nothing changed

    # a later run: one new image, and the broken one now succeeded
    new = [
        ok_row("/img/horse.jpg", "a horse in a field", ["no", "no car"], [0, 0, 1, 0], run=run, at=later(5)),
        ok_row(ERROR_URI, "a repaired photo of a lighthouse", ["no", "no car"], [0, 0, 0, 1], run=run, at=later(5)),
    ]
    write_rows(src / "part-1.parquet", new, run)
    second = build_index([], db)  # sources recorded in the index are re-scanned
    assert second.rebuilt and (second.info.rows, second.info.searchable_rows, len(second.info.files)) == (7, 7, 2)
    with ImageIndex.open(db) as idx:
        assert uris(idx.search_text("horse")) == ["horse.jpg"]
        assert uris(idx.search_text("lighthouse")) == ["broken.jpg"]
        assert uris(idx.search_vector([0, 0, 1, 0], k=1)) == ["horse.jpg"]
        assert idx.sql("SELECT count(*) FROM images WHERE status = 'error'").rows == [(0,)]


def test_reindex_with_ann_forced_then_auto(tmp_path):
    write_rows(tmp_path / "a.parquet", crafted_rows(), run_metadata())
    db = tmp_path / "index.duckdb"
    assert build_index([tmp_path / "a.parquet"], db, ann=True).info.ann
    report = build_index([], db, ann_min_rows=1_000)  # below the threshold: rebuilt without ANN
    assert report.rebuilt and not report.info.ann


# -- near-duplicates ------------------------------------------------------------------


def test_duplicates_groups_connected_near_identical_images(tmp_path):
    run = run_metadata()
    rows = [
        ok_row("/img/a.jpg", "a", ["no", "no"], [1, 0, 0, 0], run=run),
        ok_row("/img/a_copy.jpg", "a copy", ["no", "no"], [0.999, 0.04, 0, 0], run=run),
        ok_row("/img/a_copy2.jpg", "a copy of the copy", ["no", "no"], [0.995, 0.09, 0, 0], run=run),
        ok_row("/img/b.jpg", "b", ["no", "no"], [0, 1, 0, 0], run=run),
        ok_row("/img/c.jpg", "c", ["no", "no"], [0, 0, 1, 0], run=run),
        ok_row("/img/c_crop.jpg", "c crop", ["no", "no"], [0, 0.1, 0.99, 0], run=run),
    ]
    write_rows(tmp_path / "a.parquet", rows, run)
    build_index([tmp_path / "a.parquet"], tmp_path / "index.duckdb")
    with ImageIndex.open(tmp_path / "index.duckdb") as idx:
        groups = idx.duplicates(0.99)
        assert [[m.uri for m in g] for g in groups] == [
            ["/img/a.jpg", "/img/a_copy.jpg", "/img/a_copy2.jpg"],
            ["/img/c.jpg", "/img/c_crop.jpg"],
        ]
        assert all(m.similarity >= 0.99 for g in groups for m in g)
        assert idx.duplicates(0.9999) == []


def test_index_never_overwrites_a_file_that_is_not_an_index(tmp_path, crafted_dir):
    parquet = crafted_dir / "part-0.parquet"
    before = parquet.read_bytes()
    for fresh in (False, True):
        with pytest.raises(SearchError, match="refusing to overwrite"):
            build_index([crafted_dir], parquet, fresh=fresh)
    assert parquet.read_bytes() == before
    with pytest.raises(SearchError, match="cannot open the index"):
        ImageIndex.open(parquet)


def test_hybrid_with_an_image_fuses_bm25_and_image_similarity(index, tmp_path):
    from PIL import Image

    query = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(query)
    # text "beach": people 1, dog 2; image (the red car's vector): car 1, cat 2, dog 3, people 4, sign 5
    hits = index.search("beach", image=query, k=3)
    assert uris(hits) == ["people_beach.jpg", "dog_beach.jpg", "red_car.jpg"]
    assert [h.score for h in hits] == pytest.approx([1 / 61 + 1 / 64, 1 / 62 + 1 / 63, 1 / 61])
    with pytest.raises(SearchError, match="not both"):
        index.search("beach", image=query, mode="semantic")
