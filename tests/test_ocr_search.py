"""A word that appears only as text inside an image finds that image: `captioner run --ocr` with the real
OCR model on Ray, then `captioner index`, `captioner search` and the page's API."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from examples.synthetic_photos import make_jpegs
from examples.text_images import text_image
from pipeline.cli import main
from pipeline.search import ImageIndex
from pipeline.serve.app import create_app
from pipeline.serve.service import IndexService
from pipeline.serve.thumbs import ThumbnailCache

pytest.importorskip("rapidocr_onnxruntime")

WORD = "zanzibar"


def _invoke(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_search_finds_an_image_by_the_text_inside_it(ray_local, tmp_path, tiny_clip_dir):
    src = tmp_path / "photos"
    make_jpegs(src, 3, size=(160, 120))  # text-free photos
    # The only mention of the word is the sign in the picture: not the file name, not a caption (none is written).
    # (The word stands on a line of its own: PP-OCRv4 sometimes drops the space between words, README.)
    text_image(["ZANZIBAR", "bakery and fresh bread"], size=32, rotation=-4, background="photo").save(src / "IMG_0042.jpg")
    (src / "notes.jpg").write_bytes(b"zanzibar, but as text bytes: not an image")
    out = tmp_path / "captions.parquet"
    _invoke("run", src, "--out", out, "--ocr", "--no-caption", "--no-probes", "--embed-model", tiny_clip_dir, "--no-progress")

    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 5  # one row per file, the bad one included
    sign = rows["IMG_0042.jpg"]["text"]
    assert sign.splitlines()[0] == "ZANZIBAR" and "bread" in sign.splitlines()[1]
    assert rows["notes.jpg"]["status"] == "error" and rows["notes.jpg"]["text"] is None
    assert {rows[f"img_00000{i}.jpg"]["text"] for i in range(3)} == {""}  # read, and nothing there
    assert rows["IMG_0042.jpg"]["ocr_model"] == "rapidocr-onnxruntime"

    db = tmp_path / "index.duckdb"
    _invoke("index", out, "--db", db)
    hits = json.loads(_invoke("search", WORD, "--mode", "text", "--index", db, "--json"))
    assert [h["uri"].rsplit("/", 1)[-1] for h in hits] == ["IMG_0042.jpg"]
    # --where reads the text column.
    hits = json.loads(_invoke("search", "bread", "--mode", "text", "--where", "text ILIKE '%zanzibar%'", "--index", db,
                              "--json"))  # fmt: skip
    assert [h["uri"].rsplit("/", 1)[-1] for h in hits] == ["IMG_0042.jpg"]

    index = ImageIndex.open(db)
    try:
        client = TestClient(create_app(IndexService(index), ThumbnailCache(tmp_path / "thumbs")))
        page = client.get("/api/search", params={"q": WORD, "mode": "text"}).json()
        assert [h["uri"].rsplit("/", 1)[-1] for h in page["hits"]] == ["IMG_0042.jpg"]
        assert client.get("/api/search", params={"q": WORD, "mode": "text", "text": "without"}).json()["hits"] == []
        # Every image is a semantic hit; the filter keeps those with text, or those without.
        semantic = {"q": "a photo", "mode": "semantic"}
        with_text = client.get("/api/search", params={**semantic, "text": "with"}).json()
        assert [h["uri"].rsplit("/", 1)[-1] for h in with_text["hits"]] == ["IMG_0042.jpg"]
        without = client.get("/api/search", params={**semantic, "text": "without"}).json()
        assert sorted(h["uri"].rsplit("/", 1)[-1] for h in without["hits"]) == [f"img_00000{i}.jpg" for i in range(3)]
        row = client.get(f"/api/images/{page['hits'][0]['id']}").json()
        assert row["text"] == sign
        assert client.get("/api/search", params={"q": WORD, "text": "maybe"}).status_code == 400
    finally:
        index.close()
