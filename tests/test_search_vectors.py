"""The vector file (issue 16): exact = brute force, filters complete, ANN, updates in place, faults.

Random clustered vectors through real Parquet written by tests/rows.py, so the
builder and the reader are the ones `captioner index` / `search` run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys

import numpy as np
import pytest

from pipeline.search import ImageIndex, SearchError, build_index, contract, vectors
from tests.cli import cli
from tests.search_data import later, ok_row, run_metadata, write_rows

DIM = 16
RUN = run_metadata(dim=DIM)


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(4, n // 100), DIM))
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_part(path, start: int, x: np.ndarray, *, at=None) -> None:
    rows = [
        ok_row(f"/img/{start + i:06d}.jpg", f"photo {start + i}", ["yes" if (start + i) % 1000 == 7 else "no", "no car"],
               v, run=RUN, **({"at": at} if at else {}))
        for i, v in enumerate(x)
    ]
    write_rows(path, rows, RUN)


def brute(x: np.ndarray, q: np.ndarray, k: int, keep=None) -> list[int]:
    scores = x @ (q / np.linalg.norm(q))
    order = [i for i in np.lexsort((np.arange(len(x)), -scores)) if keep is None or keep(i)]
    return order[:k]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vec")
    x = clustered(3000, seed=1)
    write_part(folder / "part-0.parquet", 0, x)
    return folder, x


def ids_to_rows(idx, hits) -> list[int]:
    return [int(h.uri.rsplit("/", 1)[1].split(".")[0]) for h in hits]


@pytest.mark.parametrize("ann", [False, True], ids=["exact", "ann"])
def test_exact_search_equals_numpy_brute_force(corpus, tmp_path, ann):
    folder, x = corpus
    db = tmp_path / "index.duckdb"
    info = build_index([folder], db, ann=ann).info
    assert info.ann == ann and info.vector_slots == 3000
    queries = clustered(20, seed=2)
    with ImageIndex.open(db) as idx:
        for q in queries:
            hits = idx.search_vector(q, 10, exact=True)
            assert ids_to_rows(idx, hits) == brute(x, q, 10)
            assert hits[0].score == pytest.approx(float(x[brute(x, q, 1)[0]] @ q), abs=1e-5)
        if ann:  # the IVF lists find (nearly) the same neighbours
            recall = np.mean([len(set(ids_to_rows(idx, idx.search_vector(q, 10))) & set(brute(x, q, 10))) / 10
                              for q in queries])
            assert recall >= 0.9


@pytest.mark.parametrize("ann", [False, True], ids=["exact", "ann"])
def test_filtered_search_is_complete_at_tiny_selectivity(corpus, tmp_path, ann):
    folder, x = corpus
    db = tmp_path / "index.duckdb"
    build_index([folder], db, ann=ann)
    q = clustered(1, seed=3)[0]
    with ImageIndex.open(db) as idx:
        # 3 rows of 3000 answer yes (0.1%): every one comes back, in cosine order
        hits = idx.search_vector(q, 10, probes=["Is there a person?=yes"])
        assert ids_to_rows(idx, hits) == brute(x, q, 10, keep=lambda i: i % 1000 == 7)
        assert len(hits) == 3
        # 10%: exactly the brute-force answer over the matching rows
        hits = idx.search_vector(q, 10, where="id % 10 = 3")
        assert [h.id for h in hits] == [i for i in brute(x, q, 3000) if i % 10 == 3][:10]
        assert idx.search_vector(q, 5, where="uri = '/img/002999.jpg'")[0].uri == "/img/002999.jpg"


def test_min_score_keeps_only_hits_at_or_above_the_cosine(corpus, tmp_path):
    folder, x = corpus
    db = tmp_path / "index.duckdb"
    build_index([folder], db)
    q = x[5]
    with ImageIndex.open(db) as idx:
        hits = idx.search_vector(q, 100, min_score=0.9)
    expected = [i for i in brute(x, q, 100) if x[i] @ q >= 0.9 - 1e-6]
    assert ids_to_rows(None, hits) == expected and all(h.score >= 0.9 for h in hits)


@pytest.mark.parametrize("ann", [False, True], ids=["exact", "ann"])
def test_an_update_appends_only_the_new_rows_and_equals_a_fresh_build(corpus, tmp_path, ann):
    folder, x = corpus
    src = tmp_path / "out"
    src.mkdir()
    (src / "part-0.parquet").write_bytes((folder / "part-0.parquet").read_bytes())
    db, fresh_db = tmp_path / "index.duckdb", tmp_path / "fresh.duckdb"
    first = build_index([src], db, ann=ann)
    old_file = first.info.vector_file
    # a later run: 50 new images, and 10 old ones re-embedded (their rows replaced)
    added = clustered(50, seed=4)
    write_part(src / "part-1.parquet", 3000, added, at=later(5))
    changed = clustered(10, seed=5)
    write_part(src / "part-2.parquet", 0, changed, at=later(6))
    update = build_index([], db, ann=ann)
    assert update.rebuilt and update.vectors_read == 60 and not update.vectors_rewritten
    assert update.info.vector_file == old_file and update.info.vector_slots == 3060  # 10 dead slots
    assert update.info.embedded_rows == 3050
    build_index([src], fresh_db, ann=ann, fresh=True)
    truth = np.concatenate([changed, x[10:], added])
    with ImageIndex.open(db) as idx, ImageIndex.open(fresh_db) as fresh:
        for q in clustered(10, seed=6):
            updated_hits = idx.search_vector(q, 10, exact=True)
            fresh_hits = fresh.search_vector(q, 10, exact=True)
            assert [(h.uri, round(h.score, 6)) for h in updated_hits] == [(h.uri, round(h.score, 6)) for h in fresh_hits]
            assert ids_to_rows(idx, updated_hits) == brute(truth, q, 10)
            if ann:
                assert len(idx.search_vector(q, 10)) == 10


def test_compaction_rewrites_the_file_when_a_quarter_is_dead(tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    write_part(src / "part-0.parquet", 0, clustered(100, seed=1))
    db = tmp_path / "index.duckdb"
    first = build_index([src], db).info.vector_file
    write_part(src / "part-1.parquet", 0, clustered(40, seed=2), at=later(5))  # 40 of 100 replaced
    report = build_index([], db)
    assert report.vectors_rewritten and report.info.vector_file != first and report.info.vector_slots == 100
    assert sorted(p.name for p in tmp_path.iterdir() if vectors.is_vector_file_of(p.name, db.name)) == sorted(
        vectors.file_names(report.info.vector_file)
    )


# -- faults -----------------------------------------------------------------------


@pytest.fixture
def small_index(tmp_path):
    write_part(tmp_path / "part-0.parquet", 0, clustered(200, seed=1))
    db = tmp_path / "index.duckdb"
    info = build_index([tmp_path / "part-0.parquet"], db).info
    return db, contract.vector_path(db, info)


def _fails_opening_with(db, *fragments):
    with pytest.raises(SearchError) as caught:
        ImageIndex.open(db)
    message = str(caught.value)
    assert "\n" not in message and "captioner index --fresh" in message, message
    for fragment in fragments:
        assert fragment in message, message
    # the CLI says the same in one line
    out = cli("sql", "SELECT 1", "--index", str(db), exit_code=1).output.strip()
    assert len(out.splitlines()) == 1 and "captioner index --fresh" in out


def test_a_truncated_vector_file_names_the_fix(small_index):
    db, path = small_index
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    _fails_opening_with(db, "truncated")


def test_a_foreign_vector_file_names_the_fix(small_index):
    db, path = small_index
    path.write_bytes(b"PAR1" + os.urandom(5000))
    _fails_opening_with(db, "not a captioner vector file")


def test_a_missing_vector_file_names_the_fix(small_index):
    db, path = small_index
    path.unlink()
    _fails_opening_with(db, "lacks its vector file")


def test_vectors_of_another_dimension_name_the_fix(small_index):
    db, path = small_index
    data = bytearray(path.read_bytes())
    header = json.loads(bytes(data[len(vectors.MAGIC):vectors.HEADER_BYTES]).decode())
    header["dim"] = 8
    fake = vectors.VectorHeader(**header).encode()
    path.write_bytes(fake + bytes(data[vectors.HEADER_BYTES:]))
    _fails_opening_with(db, "8-dimensional")


def test_an_index_of_an_older_format_names_the_fix(small_index):
    import duckdb

    db, _ = small_index
    con = duckdb.connect(str(db))
    con.execute(f"UPDATE {contract.INDEX_META} SET value = '1' WHERE key = 'index_format'")
    con.close()
    _fails_opening_with(db, "format 1")
    # and `captioner index` rebuilds it without being told
    assert build_index([], db).rebuilt
    with ImageIndex.open(db) as idx:
        assert idx.info.index_format == contract.INDEX_FORMAT


_KILL_BEFORE_PUBLISH = """
import os, signal, sys
from pipeline.search import contract, index
real = contract.write_info
def die(con, info):
    os.kill(os.getpid(), signal.SIGKILL)  # the vectors are appended; the catalogue is not published
contract.write_info = die
index.build_index([], sys.argv[1])
"""


@pytest.mark.subprocess
def test_kill_9_during_an_update_leaves_the_previous_index_usable(corpus, tmp_path):
    folder, x = corpus
    src = tmp_path / "out"
    src.mkdir()
    (src / "part-0.parquet").write_bytes((folder / "part-0.parquet").read_bytes())
    db = tmp_path / "index.duckdb"
    build_index([src], db)
    q = clustered(1, seed=7)[0]
    with ImageIndex.open(db) as idx:
        before = [(h.uri, h.score) for h in idx.search_vector(q, 10)]
        write_part(src / "part-1.parquet", 3000, clustered(30, seed=8), at=later(5))
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        done = subprocess.run([sys.executable, "-c", _KILL_BEFORE_PUBLISH, str(db)], env=env, timeout=120)
        assert done.returncode == -9
        # a reader that was open keeps answering, and a new reader sees the old index whole
        assert [(h.uri, h.score) for h in idx.search_vector(q, 10)] == before
    with ImageIndex.open(db) as idx:
        assert idx.info.embedded_rows == 3000
        assert [(h.uri, h.score) for h in idx.search_vector(q, 10)] == before
    # the rerun appends after the committed slots (the killed build's rows are cut off)
    report = build_index([], db)
    assert report.vectors_read == 30 and report.info.vector_slots == 3030
    fresh = tmp_path / "fresh.duckdb"
    build_index([src], fresh, fresh=True)
    with ImageIndex.open(db) as idx, ImageIndex.open(fresh) as other:
        assert [(h.uri, round(h.score, 6)) for h in idx.search_vector(q, 10, exact=True)] == [
            (h.uri, round(h.score, 6)) for h in other.search_vector(q, 10, exact=True)
        ]


def test_serve_reopens_an_updated_index_and_the_old_reader_keeps_answering(tmp_path):
    from starlette.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import IndexService
    from pipeline.serve.thumbs import ThumbnailCache

    src = tmp_path / "out"
    src.mkdir()
    x = clustered(200, seed=1)
    write_part(src / "part-0.parquet", 0, x)
    db = tmp_path / "index.duckdb"
    build_index([src], db)
    index = ImageIndex.open(db)
    service = IndexService(index, reopen_every=0, log=lambda line: None)
    client = TestClient(create_app(service, ThumbnailCache(tmp_path / "thumbs")))
    try:
        before = client.get("/api/images/3/similar", params={"limit": 5}).json()
        assert before["index"]["generation"] == 1
        write_part(src / "part-1.parquet", 200, x[3:4], at=later(5))  # a new image with row 3's vector
        assert build_index([], db).vectors_read == 1
        # the reader opened before the update answers as before (its catalogue covers the old slots)
        assert [h.uri for h in index.search_similar(3, 5)] == [h["uri"] for h in before["hits"]]
        deadline = time.monotonic() + 10
        while client.get("/api/info").json()["generation"] != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = client.get("/api/images/3/similar", params={"limit": 2}).json()
        assert after["index"]["generation"] == 2
        assert {h["uri"] for h in after["hits"]} == {"/img/000003.jpg", "/img/000200.jpg"}
    finally:
        service.close()
        index.close()


def test_min_score_on_the_page_api_and_the_cli(tmp_path):
    from starlette.testclient import TestClient

    from pipeline.serve.app import create_app
    from pipeline.serve.service import IndexService
    from pipeline.serve.thumbs import ThumbnailCache

    x = clustered(200, seed=1)
    write_part(tmp_path / "part-0.parquet", 0, x)
    db = tmp_path / "index.duckdb"
    build_index([tmp_path / "part-0.parquet"], db)
    with ImageIndex.open(db) as index:
        service = IndexService(index, reopen_every=None, log=lambda line: None)
        client = TestClient(create_app(service, ThumbnailCache(tmp_path / "thumbs")))
        page = client.get("/api/images/3/similar", params={"limit": 100, "min_score": 0.9}).json()
        expected = [f"/img/{i:06d}.jpg" for i in brute(x, x[3], 100) if x[i] @ x[3] >= 0.9 - 1e-6]
        assert [h["uri"] for h in page["hits"]] == expected and all(h["score"] >= 0.9 for h in page["hits"])
        assert client.get("/api/images/3/similar", params={"min_score": "2"}).status_code == 400
        service.close()
    # hybrid scores are ranks: the CLI refuses a cosine threshold there, in one line
    out = cli("search", "beach", "--index", db, "--min-score", "0.5", "--mode", "hybrid", exit_code=1).output.strip()
    assert len(out.splitlines()) == 1 and "--min-score" in out and "semantic" in out


def test_filtered_ann_probes_the_lists_and_falls_back_to_an_exact_scan_when_they_hold_too_few(corpus, tmp_path,
                                                                                             monkeypatch):
    from pipeline.search import scan

    folder, x = corpus
    db = tmp_path / "index.duckdb"
    build_index([folder], db, ann=True)
    monkeypatch.setattr(scan, "EXACT_FILTER_ROWS", 10)  # every filter below goes through the IVF lists first
    with ImageIndex.open(db, nprobe=1) as idx:
        for q in clustered(10, seed=9):
            hits = idx.search_vector(q, 10, where="id % 10 = 3")
            assert len(hits) == 10 and all(h.id % 10 == 3 for h in hits)
            # 30 rows pass; one probed list holds about 1 of them: too few, so the matching rows are scanned exactly
            hits = idx.search_vector(q, 10, where="id % 100 = 3")
            assert [h.id for h in hits] == [i for i in brute(x, q, 3000) if i % 100 == 3][:10]
    with ImageIndex.open(db) as idx:
        idx.vectors.nprobe = len(idx.vectors.centroids)  # every list probed: the masked IVF scan is exact
        for q in clustered(5, seed=10):
            hits = idx.search_vector(q, 10, where="id % 10 = 3")
            assert [h.id for h in hits] == [i for i in brute(x, q, 3000) if i % 10 == 3][:10]


def test_a_filters_ids_become_sorted_live_slots_each_once_in_any_order():
    """What a filtered scan reads: ids in any order, repeated, unknown or of dead slots give each live slot once, sorted."""
    from pipeline.search.scan import VectorStore

    planes = vectors.VectorPlanes(*vectors.split(np.eye(6, 4, dtype=np.float32)))
    slot_ids = np.array([10, -1, 12, 13, 14, 11])  # slot 1 dead (its row replaced by slot 5)
    store = VectorStore(planes, slot_ids, np.ones(6, np.float32), id_count=15)
    assert store.slots_of([10, 11, 12]).tolist() == [0, 2, 5]
    assert store.slots_of([11, 14, 10, 14, 99, -3, 7]).tolist() == [0, 4, 5]
    assert store.slots_of([12, 13]).tolist() == [2, 3]
    assert store.slots_of([]).tolist() == []


# -- the two planes and the two-pass scan --------------------------------------------


def test_the_two_halves_give_back_every_float32_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 33)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, np.float32(1e-42), -np.finfo(np.float32).max]  # zeros, a subnormal, an extreme
    high, low = vectors.split(x)
    assert high.dtype == low.dtype == np.uint16
    assert vectors.join(high, low).tobytes() == x.tobytes()
    planes = vectors.VectorPlanes(high, low)
    assert planes[np.array([3, 0])].tobytes() == x[[3, 0]].tobytes() and planes[2:5].tobytes() == x[2:5].tobytes()


@pytest.mark.parametrize("dim", [16, 768])
def test_the_first_pass_never_strays_beyond_its_error_bound(dim):
    """The bound the exact scan relies on, against the true (float64) dot products, random and worst-case rows."""
    import torch

    from pipeline.search.scan import VectorStore, error_bound

    rng = np.random.default_rng(dim)
    random = rng.standard_normal((2000, dim))
    # every term of the same sign, each value just under a power of two: truncation and rounding errors all add up
    coherent = np.full((2000, dim), 2 - 2.0 ** -7 - 2.0 ** -20) * rng.choice([0.5, 1, 2], (2000, 1))
    for x, q in [(random, rng.standard_normal(dim)), (coherent, np.full(dim, 1.0 + 2.0 ** -9 - 2.0 ** -20))]:
        x = x.astype(np.float32)
        q = (q / np.linalg.norm(q)).astype(np.float32)
        norms = np.linalg.norm(x, axis=1).astype(np.float32)
        store = VectorStore(vectors.VectorPlanes(*vectors.split(x)), np.arange(len(x)), (1 / norms).astype(np.float32),
                            id_count=len(x))
        approx = store._approx(torch.from_numpy(q).to(torch.bfloat16))
        true = (x.astype(np.float64) @ q.astype(np.float64)) / norms.astype(np.float64)
        worst = np.max(np.abs(approx - true))
        assert worst <= error_bound(dim) * np.linalg.norm(q), (worst, error_bound(dim))
        assert worst > error_bound(dim) / 1000  # the first pass does round: the bound is not vacuous here


def test_exact_search_orders_rows_the_first_pass_cannot_tell_apart():
    """Rows whose high halves are equal differ only in their low halves: the answer is still the exact order."""
    from pipeline.search.scan import DIRECT_ROWS, VectorStore

    rng = np.random.default_rng(3)
    n = 3 * DIRECT_ROWS  # enough rows for the two-pass path, not the direct one
    bits = np.tile(rng.standard_normal(DIM).astype(np.float32).view(np.uint32) & 0xFFFF0000, (n, 1))
    bits |= rng.integers(0, 1 << 16, bits.shape, dtype=np.uint32)  # one bfloat16 row, n different float32 ones
    x = bits.view(np.float32)
    norms = np.linalg.norm(x, axis=1).astype(np.float32)
    store = VectorStore(vectors.VectorPlanes(*vectors.split(x)), np.arange(n), (1 / norms).astype(np.float32), id_count=n)
    q = rng.standard_normal(DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    cosine = (x.astype(np.float64) @ q.astype(np.float64)) * (1 / norms).astype(np.float64)
    for k in (1, 7, 40):
        for allowed in (None, np.arange(0, n, 2)):
            hits = store.top_k(q, k, allowed, exact=True)
            pool = np.arange(n) if allowed is None else allowed
            assert [i for i, _ in hits] == pool[np.argsort(-cosine[pool], kind="stable")[:k]].tolist()


def test_sql_reads_back_the_stored_float32_values_unchanged(small_index, tmp_path):
    import pyarrow.parquet as pq

    db, _ = small_index
    stored = pq.read_table(tmp_path / "part-0.parquet", columns=["uri", "embedding"]).sort_by("uri")
    want = stored.column("embedding").combine_chunks().flatten().to_numpy()
    with ImageIndex.open(db) as idx:
        rows = idx.sql("SELECT embedding FROM images ORDER BY uri").rows
        assert np.array([row[0] for row in rows], np.float32).ravel().tobytes() == want.tobytes()
        by_id = idx.sql("SELECT e.embedding FROM embeddings AS e JOIN images USING (id) WHERE uri = '/img/000123.jpg'").rows
        assert np.array(by_id[0][0], np.float32).tobytes() == want.reshape(-1, DIM)[123].tobytes()
        with pytest.raises(Exception, match="no vector slot"):
            idx.sql("SELECT captioner_embedding(1000000000)")


def test_a_truncated_or_missing_low_half_file_names_the_fix(small_index):
    db, path = small_index
    low = vectors.low_path(path)
    with open(low, "r+b") as handle:
        handle.truncate(low.stat().st_size - 2)
    _fails_opening_with(db, "truncated")
    low.unlink()
    _fails_opening_with(db, "lacks its vector file", low.name)


def test_a_vector_file_of_the_float32_format_names_the_fix(small_index):
    """An index whose vector file predates the two halves (format 1: one float32 matrix)."""
    db, path = small_index
    data = bytearray(path.read_bytes())
    header = json.loads(bytes(data[len(vectors.MAGIC):vectors.HEADER_BYTES]).decode())
    header["format"] = 1
    path.write_bytes(vectors.VectorHeader(**header).encode() + bytes(data[vectors.HEADER_BYTES:]))
    _fails_opening_with(db, "format 1")


def test_an_index_whose_rows_have_no_vectors_answers_vector_queries_with_no_hits(tmp_path):
    """Every row an error or without an embedding: the vector file has no rows, and a query finds nothing."""
    from tests.search_data import error_row

    rows = [error_row("/img/a.jpg", run=RUN), ok_row("/img/b.jpg", "a cat", ["yes", "no car"], None, run=RUN)]
    write_rows(tmp_path / "part-0.parquet", rows, RUN)
    db = tmp_path / "index.duckdb"
    assert build_index([tmp_path / "part-0.parquet"], db).info.vector_slots == 0
    q = clustered(1, seed=1)[0]
    with ImageIndex.open(db) as idx:
        for kwargs in ({}, {"exact": True}, {"where": "id >= 0"}, {"min_score": 0.5}):
            assert idx.search_vector(q, 5, **kwargs) == []
