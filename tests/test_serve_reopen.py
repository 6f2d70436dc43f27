"""`captioner serve` reopens a rebuilt index (issue 14 item 8), in process: the swap, pinning, a failing reopen.

The whole scenario (a real `captioner serve`, `captioner index` rebuilding
its --db under load) is tests/test_fault_serve.py; these check the edges fast,
through Starlette's TestClient over the crafted index of tests/serve_support.py.
"""

from __future__ import annotations

import os
import time

import pytest
from starlette.testclient import TestClient

from pipeline.search import ImageIndex, SearchError, build_index
from pipeline.serve.app import create_app
from pipeline.serve.service import IndexService
from pipeline.serve.thumbs import ThumbnailCache
from tests import search_doubles
from tests.serve_support import crafted_images_index

search_doubles.register()


@pytest.fixture()
def served(tmp_path):
    """(client, service, db, log lines, parquet) over a fresh index; the service looks for a rebuild on every request."""
    parquet, _ = crafted_images_index(tmp_path)
    db = tmp_path / "index.duckdb"
    build_index([parquet], db)
    lines: list[str] = []
    index = ImageIndex.open(db)
    service = IndexService(index, reopen_every=0, log=lines.append)
    client = TestClient(create_app(service, ThumbnailCache(tmp_path / "thumbs")))
    yield client, service, db, lines, parquet
    service.close()
    index.close()


def _generation_after_requests(client, want: int, timeout_s: float = 10.0) -> dict:
    """Ask /api/info until the answer comes from generation ``want`` (the reopen runs in the background)."""
    deadline = time.monotonic() + timeout_s
    while (info := client.get("/api/info").json())["generation"] != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return info


def test_a_rebuilt_index_is_answered_after_a_request_notices_it(served):
    client, service, db, lines, parquet = served
    first = client.get("/api/search", params={"q": "beach", "mode": "text"}).json()
    assert first["index"]["generation"] == 1 and first["index"]["searchable_rows"] == 5
    old = service.index
    build_index([parquet], db, fresh=True)  # a temporary file renamed over the index: a new inode
    info = _generation_after_requests(client, 2)
    assert info["generation"] == 2 and info["searchable_rows"] == 5, info
    page = client.get("/api/search", params={"q": "beach", "mode": "text"}).json()
    assert page["index"]["generation"] == 2 and [h["uri"] for h in page["hits"]] == [h["uri"] for h in first["hits"]]
    assert [line for line in lines if "refreshed" in line] == [lines[0]] and str(db) in lines[0], lines
    with pytest.raises(SearchError, match="closed"):
        old.sql("SELECT 1")  # the old connection was closed: its (deleted) file is released


def test_a_request_that_pinned_the_old_index_finishes_on_it(served):
    client, service, db, lines, parquet = served
    with service._pinned() as pinned:
        build_index([parquet], db, fresh=True)
        assert service.reopen()
        assert service.generation == 2
        assert pinned.index.sql("SELECT count(*) FROM image_rows").rows == [(6,)]  # still open for its request
    with pytest.raises(SearchError, match="closed"):
        pinned.index.sql("SELECT 1")  # closed once that request was done


def test_a_failing_reopen_keeps_serving_the_old_index_and_logs_one_line(served):
    client, service, db, lines, parquet = served
    broken = db.with_name(".broken.duckdb")
    broken.write_bytes(b"this is not a DuckDB file" * 100)
    os.replace(broken, db)  # as a rename over it would
    for _ in range(5):
        response = client.get("/api/search", params={"q": "beach", "mode": "text"})
        assert response.status_code == 200 and response.json()["index"]["generation"] == 1
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == 1 and lines[0].startswith("warning: cannot reopen") and "still serving" in lines[0], lines
    assert "\n" not in lines[0]
    # The file changes again, into a good index: that one is opened.
    good = db.with_name("good.duckdb")
    build_index([parquet], good)
    os.replace(good, db)
    assert _generation_after_requests(client, 2)["generation"] == 2
    assert len(lines) == 2 and "refreshed" in lines[1], lines


def test_a_failed_rebuild_leaves_the_served_index_as_it_was(served, monkeypatch):
    """A build that fails half-way never replaces the file, so the server never opens half an index."""
    import pipeline.search.index as index_module

    client, service, db, lines, parquet = served

    def fail(*args, **kwargs):
        raise RuntimeError("the build died half-way")

    monkeypatch.setattr(index_module, "_build_docs", fail)
    with pytest.raises(RuntimeError):
        build_index([parquet], db, fresh=True)
    for _ in range(3):
        assert client.get("/api/info").json()["generation"] == 1
        time.sleep(0.05)
    assert not lines and not [p for p in db.parent.iterdir() if p.name.startswith(".") and "duckdb" in p.name]
