"""`captioner serve`'s JSON API, thumbnails and safety, through Starlette's TestClient.

The index is the crafted one of tests/search_data.py (known captions, probe
answers and vectors from the lookup-table TEST DOUBLE in
tests/search_doubles.py), with uris on real files: a plain PNG, an
EXIF-rotated JPEG, a missing file and a corrupt one. The page itself, on an
index built by the real pipeline, is tested in a browser by
tests/test_serve_page.py.
"""

from __future__ import annotations

import hashlib
import io

import duckdb
import pytest
from click.testing import CliRunner
from PIL import Image
from starlette.testclient import TestClient

from pipeline.search import ImageIndex, build_index
from pipeline.serve import app as app_module
from pipeline.serve.app import create_app
from pipeline.serve.command import allowed_hosts_for, is_loopback
from pipeline.serve.service import MAX_RESULTS, IndexService, confidence_condition, has_yes_prob
from pipeline.serve.thumbs import SIDES, ThumbnailCache, default_cache_dir
from tests import search_doubles
from tests.search_data import CAR, PERSON, QUOTE_CAPTION
from tests.serve_support import CORRUPT, MISSING, ROTATED, LiveServer, crafted_images_index

search_doubles.register()
search_doubles.TEXT_VECTORS.update({"beach": [1, 0, 0, 0]})
search_doubles.IMAGE_VECTORS.update({(255, 0, 0): [0.6, 0, 0.8, 0]})


def names(hits):
    return [h["uri"].rsplit("/", 1)[-1] for h in hits]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    parquet, paths = crafted_images_index(folder)
    db = folder / "index.duckdb"
    build_index([parquet], db)
    return db, paths


@pytest.fixture(scope="module")
def service(built):
    db, _ = built
    index = ImageIndex.open(db)
    yield IndexService(index)
    index.close()


@pytest.fixture()
def thumbs(tmp_path):
    return ThumbnailCache(tmp_path / "thumbs")


@pytest.fixture()
def client(service, thumbs):
    return TestClient(create_app(service, thumbs))


@pytest.fixture(scope="module")
def ids(service):
    return {uri.rsplit("/", 1)[-1]: i for i, uri in service.index.sql("SELECT id, uri FROM image_rows").rows}


# -- info and search -------------------------------------------------------------


def test_info_lists_modes_and_probe_filters_from_the_index(client):
    info = client.get("/api/info").json()
    assert info["modes"] == ["hybrid", "text", "semantic"] and info["default_mode"] == "hybrid"
    assert info["searchable_rows"] == 5 and info["rows"] == 6
    person, car = info["probes"]
    assert person == {"question": PERSON, "kind": "bool", "answers": []}
    # an open question offers its most common answers, most common first
    assert car["question"] == CAR and car["kind"] == "choice"
    assert car["answers"][:2] == ["no car", "there is no car"] and set(car["answers"]) == {"no car", "there is no car", "red"}
    assert info["confidence"] is False  # the tiny transformers VLM reports no yes_prob (Moondream does)


def test_search_defaults_to_hybrid_and_each_mode_ranks_as_the_cli_does(client, service):
    hybrid = client.get("/api/search", params={"q": "beach"}).json()
    expected = service.index.search_hybrid("beach", k=len(hybrid["hits"]))
    assert names(hybrid["hits"]) == [h.uri.rsplit("/", 1)[-1] for h in expected]
    assert hybrid["hits"][0]["text_rank"] is not None and hybrid["hits"][0]["semantic_rank"] is not None

    text = client.get("/api/search", params={"q": "beach", "mode": "text"}).json()
    assert names(text["hits"]) == ["people_beach.jpg", "dog_beach.jpg"] and text["more"] is False

    semantic = client.get("/api/search", params={"q": "beach", "mode": "semantic"}).json()
    assert names(semantic["hits"]) == ["cat_sofa.jpg", "dog_beach.jpg", "red_car.jpg", "people_beach.jpg", "sign.jpg"]
    assert [round(h["score"], 2) for h in semantic["hits"]] == [0.99, 0.8, 0.6, 0.4, 0.2]
    first = semantic["hits"][0]
    assert first["rank"] == 1 and first["thumb"].startswith(f"/api/images/{first['id']}/thumb?size=s&v=")


def test_load_more_pages_continue_the_ranking(client):
    pages = [
        client.get("/api/search", params={"q": "beach", "mode": "semantic", "offset": offset, "limit": 2}).json()
        for offset in (0, 2, 4)
    ]
    assert [len(p["hits"]) for p in pages] == [2, 2, 1]
    assert [p["more"] for p in pages] == [True, True, False]
    assert [h["rank"] for p in pages for h in p["hits"]] == [1, 2, 3, 4, 5]
    assert names([h for p in pages for h in p["hits"]]) == [
        "cat_sofa.jpg", "dog_beach.jpg", "red_car.jpg", "people_beach.jpg", "sign.jpg",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "params",
    [
        {"offset": -1},
        {"limit": 0},
        {"offset": MAX_RESULTS, "limit": 1},
        {"limit": "ten"},
        {"mode": "psychic"},
        {"q": ""},
    ],
)
def test_bad_search_parameters_are_400_with_a_message(client, params):
    response = client.get("/api/search", params={"q": "beach", **params})
    assert response.status_code == 400 and response.json()["error"]


def test_probe_filters_yes_no_and_open_answers(client):
    yes = client.get("/api/search", params={"q": "beach", "mode": "semantic", "probe": f"{PERSON}=yes"}).json()
    assert names(yes["hits"]) == ["red_car.jpg", "people_beach.jpg"]
    no = client.get("/api/search", params={"q": "beach", "mode": "semantic", "probe": f"{PERSON}=no"}).json()
    assert names(no["hits"]) == ["cat_sofa.jpg", "dog_beach.jpg", "sign.jpg"]
    both = client.get("/api/search", params=[("q", "beach"), ("mode", "semantic"), ("probe", f"{PERSON}=yes"), ("probe", f"{CAR}=red")])
    assert names(both.json()["hits"]) == ["red_car.jpg"]
    unknown = client.get("/api/search", params={"q": "beach", "probe": "Is it a trap?=yes"})
    assert unknown.status_code == 400 and PERSON in unknown.json()["error"]


def test_confidence_filter_is_refused_without_probe_probabilities(client):
    response = client.get("/api/search", params={"q": "beach", "probe": f"{PERSON}=yes", "confidence": "0.8"})
    assert response.status_code == 400 and "yes_prob" in response.json()["error"]
    assert client.get("/api/search", params={"q": "beach", "confidence": "nan"}).status_code == 400


def test_yes_prob_is_detected_by_the_probes_column_type():
    assert has_yes_prob("STRUCT(question VARCHAR, answer VARCHAR, answer_bool BOOLEAN, yes_prob FLOAT)[]")
    assert has_yes_prob('STRUCT("question" VARCHAR, yes_prob DOUBLE, answer VARCHAR)[]')
    assert not has_yes_prob("STRUCT(question VARCHAR, answer VARCHAR, answer_bool BOOLEAN)[]")
    assert not has_yes_prob("STRUCT(question VARCHAR, yes_prob VARCHAR)[]")  # only a float counts
    assert not has_yes_prob("STRUCT(question VARCHAR, not_yes_prob FLOAT)[]")


def test_confidence_condition_keeps_answers_sure_enough(tmp_path):
    """The --where text the page builds for a threshold, run on a table shaped like a schema with yes_prob."""
    question = "Is it Bob's dog?"  # a quote in the index's own question text stays inside its literal
    con = duckdb.connect()
    con.execute("CREATE TABLE images (id INT, probes STRUCT(question VARCHAR, answer VARCHAR, answer_bool BOOLEAN, yes_prob FLOAT)[])")
    for i, p in enumerate([0.95, 0.7, 0.3, 0.05]):
        con.execute("INSERT INTO images VALUES (?, [{'question': ?, 'answer': ?, 'answer_bool': ?, 'yes_prob': ?}])",
                    [i, question, "yes" if p > 0.5 else "no", p > 0.5, p])  # fmt: skip

    def kept(probe, floor):
        cond = confidence_condition([probe], [question], floor)
        return [r[0] for r in con.execute(f"SELECT id FROM images WHERE {cond} ORDER BY id").fetchall()]

    assert kept(f"{question}=yes", 0.9) == [0]
    assert kept(f"{question}=yes", 0.6) == [0, 1]
    assert kept(f"{question}=no", 0.9) == [3]
    assert kept(f"{question}=no", 0.6) == [2, 3]
    # open answers and questions not in the index add no condition (the probe filter refuses the latter)
    assert confidence_condition(["What colour?=red", "Unknown?=yes"], [question], 0.9) is None


def test_query_text_with_sql_in_it_is_only_words(client, built):
    db, _ = built
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for q in ["'; DROP TABLE image_rows; --", "o'clock", 'it"s 5', "x' OR '1'='1"]:
        response = client.get("/api/search", params={"q": q, "mode": "text"})
        assert response.status_code == 200, response.text
    found = client.get("/api/search", params={"q": "clock DROP TABLE", "mode": "text"}).json()
    assert [h["caption"] for h in found["hits"]] == [QUOTE_CAPTION]
    assert client.get("/api/info").json()["rows"] == 6
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # opened read-only: the file never changes


# -- one image, more like this, search by image ---------------------------------------------------


def test_image_view_has_caption_every_probe_answer_uri_and_size(client, ids, built):
    _, paths = built
    row = client.get(f"/api/images/{ids['red_car.jpg']}").json()
    assert row["caption"] == "a red car parked in a city street"
    assert row["uri"] == str(paths["red_car.jpg"])
    assert (row["width"], row["height"], row["bytes"], row["format"]) == (640, 480, 1000, "JPEG")
    assert row["probes"] == [
        {"question": PERSON, "answer": "yes", "answer_bool": True, "yes_prob": None, "truncated": None},
        {"question": CAR, "answer": "red", "answer_bool": None, "yes_prob": None, "truncated": None},
    ]
    assert row["has_embedding"] is True and row["status"] == "ok"
    broken = client.get(f"/api/images/{ids['broken.jpg']}").json()
    assert broken["status"] == "error" and broken["has_embedding"] is False and broken["error"]


def test_more_like_this_uses_the_stored_embedding_without_re_embedding(service, client, ids, monkeypatch):
    def no_embedding(*args, **kwargs):
        raise AssertionError("more like this must not run the embedder")

    monkeypatch.setattr(service.index.embedder, "embed_images", no_embedding)
    monkeypatch.setattr(service.index.embedder, "embed_texts", no_embedding)
    page = client.get(f"/api/images/{ids['cat_sofa.jpg']}/similar").json()
    assert names(page["hits"])[:2] == ["cat_sofa.jpg", "dog_beach.jpg"]
    assert page["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    filtered = client.get(f"/api/images/{ids['cat_sofa.jpg']}/similar", params={"probe": f"{PERSON}=yes", "limit": 1}).json()
    assert names(filtered["hits"]) == ["red_car.jpg"] and filtered["more"] is True
    no_vector = client.get(f"/api/images/{ids['broken.jpg']}/similar")
    assert no_vector.status_code == 400 and "no embedding" in no_vector.json()["error"]
    assert client.get("/api/images/987654/similar").status_code == 404


def test_without_the_query_embedder_text_search_and_more_like_this_still_work(built, thumbs, ids, monkeypatch):
    """Weights missing on the serving machine: the page offers text search, and similar images from stored vectors."""
    from pipeline.search import SearchError

    def missing(self):
        raise SearchError("cannot load the embedder 'searchtest:map' that built this index: no weights")

    monkeypatch.setattr(ImageIndex, "_build_embedder", missing)
    db, _ = built
    with ImageIndex.open(db) as index:
        client = TestClient(create_app(IndexService(index), thumbs))
        info = client.get("/api/info").json()
        assert info["modes"] == ["text"] and info["default_mode"] == "text" and "no weights" in info["semantic_error"]
        assert info["similar"] is True
        assert names(client.get("/api/search", params={"q": "beach"}).json()["hits"]) == ["people_beach.jpg", "dog_beach.jpg"]
        refused = client.get("/api/search", params={"q": "beach", "mode": "hybrid"})
        assert refused.status_code == 400 and "no weights" in refused.json()["error"]
        assert client.post("/api/search/image", content=_png((255, 0, 0)), headers=PNG).status_code == 400
        like = client.get(f"/api/images/{ids['cat_sofa.jpg']}/similar").json()
        assert names(like["hits"])[:2] == ["cat_sofa.jpg", "dog_beach.jpg"]


# What the page sends with a dropped PNG (static/app.js: the file's type).
PNG = {"Content-Type": "image/png"}


def _png(color, size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def test_dropped_image_searches_by_image(client):
    page = client.post("/api/search/image", content=_png((255, 0, 0)), params={"limit": 2}, headers=PNG).json()
    assert names(page["hits"]) == ["red_car.jpg", "cat_sofa.jpg"]
    assert page["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    fused = client.post("/api/search/image", content=_png((255, 0, 0)), params={"q": "beach", "mode": "hybrid"}, headers=PNG).json()
    assert fused["hits"][0]["text_rank"] is not None  # BM25 of the text fused with the image's ranking


def test_dropped_non_image_or_oversized_upload_is_refused(client, monkeypatch):
    bad = client.post("/api/search/image", content=b"<html>not an image</html>", headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 400 and "not a usable image" in bad.json()["error"]
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 100)
    big = client.post("/api/search/image", content=_png((255, 0, 0), (64, 64)) + b"\0" * 200, headers=PNG)
    assert big.status_code == 413


# -- thumbnails ----------------------------------------------------------------------------------


def test_thumbnail_is_made_once_then_served_from_the_cache(client, thumbs, ids, service):
    url = client.get("/api/search", params={"q": "a white cat", "mode": "text"}).json()["hits"][0]["thumb"]
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert "immutable" in first.headers["cache-control"]  # the URL carries the image's content hash
    image = Image.open(io.BytesIO(first.content))
    assert max(image.size) == min(400, SIDES["s"]) and image.size == (320, 240)
    assert thumbs.generated == 1
    again = client.get(url)
    assert again.content == first.content and thumbs.generated == 1  # from the disk cache
    assert client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    # without the version the URL may outlive a re-index: revalidate
    assert client.get(f"/api/images/{ids['cat_sofa.jpg']}/thumb").headers["cache-control"] == "no-cache"
    # a fresh cache object over the same folder (a restarted server) still has it
    fresh = ThumbnailCache(thumbs.root)
    assert TestClient(create_app(service, fresh)).get(url).content == first.content and fresh.generated == 0


def test_thumbnail_applies_exif_orientation(client, ids):
    response = client.get(f"/api/images/{ids[ROTATED]}/thumb", params={"size": "l"})
    image = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert image.size == (96, 48)  # stored 48 x 96 with orientation 6
    r, g, b = image.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # the upright picture's red top-left quadrant


@pytest.mark.parametrize("name", [MISSING, CORRUPT, "broken.jpg"])
def test_missing_or_unreadable_original_gives_a_placeholder_not_an_error(client, thumbs, ids, name):
    response = client.get(f"/api/images/{ids[name]}/thumb")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert response.headers["x-thumbnail"] == "placeholder" and response.headers["cache-control"] == "no-store"
    assert thumbs.total_bytes == 0  # nothing cached: the file may come back


def test_thumbnail_size_must_be_a_known_one(client, ids):
    assert client.get(f"/api/images/{ids['sign.jpg']}/thumb", params={"size": "9999"}).status_code == 400


def test_cache_stays_within_its_bound_and_evicts_the_least_recently_used(tmp_path, built):
    _, paths = built
    sample = ThumbnailCache(tmp_path / "measure").get(str(paths["sign.jpg"]), "a", 64)
    cache = ThumbnailCache(tmp_path / "bounded", max_bytes=int(len(sample.data) * 2.5))
    for version in "abc":
        cache.get(str(paths["sign.jpg"]), version, 64)
        cache.get(str(paths["sign.jpg"]), "a", 64)  # keep "a" the most recently used
    assert cache.generated == 3
    assert cache.total_bytes <= cache.max_bytes
    files = list((tmp_path / "bounded").rglob("*.jpg"))
    assert len(files) == 2 and sum(f.stat().st_size for f in files) == cache.total_bytes
    cache.get(str(paths["sign.jpg"]), "a", 64)
    assert cache.generated == 3  # "a" survived the evictions: it was always the most recently used


def test_unwritable_cache_folder_still_serves_thumbnails(tmp_path, built):
    _, paths = built
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    cache = ThumbnailCache(blocker / "thumbs")
    assert cache.root is None
    assert cache.get(str(paths["sign.jpg"]), "a", 64) is not None


def test_default_cache_folder_is_beside_the_index(built):
    db, _ = built
    assert default_cache_dir(db) == db.parent / "index.duckdb.thumbs"


# -- safety --------------------------------------------------------------------------------------

TRAVERSALS = [
    "/api/images/../../../../etc/passwd/thumb",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumb",
    "/api/images/..%2f..%2fetc%2fpasswd/thumb",
    "/api/images/%252e%252e%252fetc%252fpasswd/thumb",
    "/api/images//etc/passwd/thumb",
    "/api/images/%2Fetc%2Fpasswd/thumb",
    "/api/images/-1/thumb",
    "/api/images/1.5/thumb",
    "/api/images/0x1/thumb",
    "/api/images/987654/thumb",
    "/api/images/987654",
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2fservice.py",
    "/static/%2e%2e%2fservice.py",
    "/static/..\\service.py",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/etc/passwd",
    "/../pyproject.toml",
]


def test_path_traversal_attempts_are_refused_over_real_http(service, thumbs, built):
    """Raw requests to a real uvicorn: no client library gets to normalise the paths first."""
    _, paths = built
    secret = paths["sign.jpg"].parent.parent / "secret.txt"
    secret.write_text("top secret")
    attempts = TRAVERSALS + [f"/static/{'../' * 12}{secret}", f"/static/{'%2e%2e%2f' * 12}{str(secret).lstrip('/')}"]
    # its own service: uvicorn's shutdown stops the service of the app it served
    own = IndexService(service.index)
    with LiveServer(create_app(own, thumbs, allowed_hosts=allowed_hosts_for("127.0.0.1"))) as server:
        for path in attempts:
            status, body = server.raw_get(path)
            assert status in (400, 404), (path, status, body[:200])
            assert b"root:" not in body and b"top secret" not in body and b"import " not in body, path
        # a path in the query string is not a way in either: the id decides, the parameter is ignored
        status, body = server.raw_get(f"/api/images/0/thumb?uri={secret}&path=/etc/passwd")
        assert status == 200 and b"top secret" not in body and b"root:" not in body


def test_host_header_must_name_loopback_when_serving_on_loopback(service, thumbs):
    guarded = TestClient(create_app(service, thumbs, allowed_hosts=allowed_hosts_for("127.0.0.1")), base_url="http://127.0.0.1:8000")
    assert guarded.get("/api/info").status_code == 200
    assert guarded.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 200
    # a DNS-rebinding page reaches the server under its own host name: refused
    assert guarded.get("/api/info", headers={"Host": "evil.example:8000"}).status_code == 400
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("::1") is not None
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("192.168.1.5")


def test_every_response_carries_the_security_headers(client):
    response = client.get("/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css", "/static/placeholder.svg"):
        assert client.get(asset).status_code == 200, asset


# -- the command ---------------------------------------------------------------------------------


class FakeUvicorn(list):
    """Stands in for uvicorn.run: records (app, kwargs) and runs ``while_serving(client)`` before "stopping"."""

    while_serving = None

    def run(self, app, **kwargs):
        self.append((app, kwargs))
        if self.while_serving:
            self.while_serving(TestClient(app, base_url=f"http://{kwargs['host']}:{kwargs['port']}"))


class _HeldPort:
    """What ``bind`` returns, for a fake server: the asked address, and no real port taken (8000 may be busy)."""

    def __init__(self, host, port):
        self.address = (host, port)

    def getsockname(self):
        return self.address

    def close(self):
        pass


@pytest.fixture()
def fake_uvicorn(monkeypatch):
    import uvicorn

    from pipeline.serve import command

    fake = FakeUvicorn()
    monkeypatch.setattr(uvicorn, "run", fake.run)
    monkeypatch.setattr(command, "bind", _HeldPort)
    return fake


def test_serve_binds_loopback_port_8000_by_default(built, fake_uvicorn, tmp_path):
    from pipeline.cli import main

    db, _ = built
    seen = []
    fake_uvicorn.while_serving = lambda client: seen.append(client.get("/api/search", params={"q": "beach"}).json())
    result = CliRunner().invoke(main, ["serve", "--index", str(db), "--thumb-cache", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    (app, kwargs), = fake_uvicorn
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8000)
    assert "http://127.0.0.1:8000/" in result.output and "warning" not in result.output
    assert len(seen[0]["hits"]) == 5  # default mode hybrid, embedder loaded from the index's spec


def test_serve_warns_when_not_bound_to_loopback(built, fake_uvicorn, tmp_path):
    from pipeline.cli import main

    db, _ = built
    args = ["serve", "--index", str(db), "--host", "0.0.0.0", "--port", "8123", "--thumb-cache", str(tmp_path / "t")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (fake_uvicorn[0][1]["host"], fake_uvicorn[0][1]["port"]) == ("0.0.0.0", 8123)
    assert "warning: listening on 0.0.0.0, not loopback" in result.output and "no login" in result.output


def test_serve_without_an_index_says_how_to_build_one(tmp_path, fake_uvicorn):
    from pipeline.cli import main

    result = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "none.duckdb")])
    assert result.exit_code == 1 and "captioner index" in result.output and not fake_uvicorn


def test_thumbnails_of_bucket_images_through_the_storage_option(s3_bucket, tmp_path, fake_uvicorn):
    """Originals in S3 (moto on loopback), reached with `captioner serve --storage-option endpoint_url=...`."""
    from pipeline.cli import main
    from tests.fixtures.images import oriented_jpeg
    from tests.search_data import ok_row, run_metadata, write_rows

    s3_bucket.put("photos/turned.jpg", oriented_jpeg(6))
    run = run_metadata()
    rows = [
        ok_row(s3_bucket.url("photos/turned.jpg"), "a turned picture", ["no", "no car"], [1, 0, 0, 0], run=run),
        ok_row(s3_bucket.url("photos/gone.jpg"), "a deleted picture", ["no", "no car"], [0, 1, 0, 0], run=run),
    ]
    write_rows(tmp_path / "captions.parquet", rows, run)
    build_index([tmp_path / "captions.parquet"], tmp_path / "index.duckdb")
    def while_serving(client):
        ids = {uri: i for i, uri in client.app.state.service.index.sql("SELECT id, uri FROM image_rows").rows}
        turned = client.get(f"/api/images/{ids[s3_bucket.url('photos/turned.jpg')]}/thumb")
        assert turned.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(turned.content)).size == (96, 48)  # EXIF orientation applied
        gone = client.get(f"/api/images/{ids[s3_bucket.url('photos/gone.jpg')]}/thumb")
        assert gone.status_code == 200 and gone.headers["x-thumbnail"] == "placeholder"
        checked.append(True)

    checked = []
    fake_uvicorn.while_serving = while_serving
    result = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "index.duckdb"), *s3_bucket.cli_options])
    assert result.exit_code == 0, (result.output, result.exception)
    assert checked == [True]
    assert len(list((tmp_path / "index.duckdb.thumbs").rglob("*.jpg"))) == 1  # cached beside the index by default


# -- small server defects (issue 14, item 10) ------------------------------------------------------


@pytest.mark.parametrize("host", ["[::1]:8000", "[::1]", "[0:0:0:0:0:0:0:1]:8000", "127.0.0.1:8000", "localhost"])
def test_host_guard_accepts_loopback_names_with_or_without_a_port(service, thumbs, host):
    """`captioner serve --host ::1`: the browser sends ``Host: [::1]:PORT``."""
    guarded = TestClient(create_app(service, thumbs, allowed_hosts=allowed_hosts_for("::1")), base_url="http://[::1]:8000")
    assert guarded.get("/api/info", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8000", "[::2]:8000", "[::1", "", "127.0.0.1.evil.example", "[::1]evil"])
def test_host_guard_refuses_other_names(service, thumbs, host):
    guarded = TestClient(create_app(service, thumbs, allowed_hosts=allowed_hosts_for("::1")), base_url="http://[::1]:8000")
    response = guarded.get("/api/info", headers={"Host": host})
    assert response.status_code == 400 and "host" in response.json()["error"].lower()


ID_ROUTES = ["/api/images/{}", "/api/images/{}/similar", "/api/images/{}/thumb"]


@pytest.mark.parametrize("route", ID_ROUTES)
@pytest.mark.parametrize("digits", [19, 20, 25, 4301, 5000])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_id_too_large_for_the_index_is_404_never_500(client, route, digits, method):
    response = client.request(method, route.format("9" * digits))
    assert response.status_code == 404, response.text[:200]
    if method == "GET":
        assert len(response.json()["error"]) < 200  # the id is not echoed back at length


@pytest.mark.parametrize("value", ["0", "-0.5", "0.0", "1.01", "7", "-inf", "1e400"])
def test_confidence_outside_zero_to_one_is_refused(client, value):
    response = client.get("/api/search", params={"q": "beach", "probe": f"{PERSON}=yes", "confidence": value})
    assert response.status_code == 400 and "(0, 1]" in response.json()["error"]


# -- bounded work per request (issue 14, item 2) -------------------------------------------------


def test_many_probe_filters_cost_linear_time_and_filter_as_few_do(service):
    """One join of the unnested answers with a bound filter table, not a subquery per filter."""
    import time

    thresholds = [f"{PERSON}<={1 - i / 10**6}" for i in range(1000)]  # all distinct
    started = time.perf_counter()
    many = service.index.search_text("beach", 10, probes=thresholds)
    assert time.perf_counter() - started < 5  # 100 subqueries took 0.7 s here, 2,000 would take minutes
    assert many == []  # this index has no yes_prob: no row passes a threshold
    # a repeated filter, another question's open answer, case in the question: the same rows as one filter each
    both = service.index.search_vector([0.6, 0, 0.8, 0], 10, probes=[f"{PERSON}=yes", f"{PERSON.upper()}=YES", f"{CAR}=Red", f"{CAR}=red"])
    assert [h.uri.rsplit("/", 1)[-1] for h in both] == ["red_car.jpg"]


@pytest.mark.parametrize(
    "params, limit",
    [
        ([("probe", f"{PERSON}=yes")] * (app_module.MAX_PROBES + 1), f"at most {app_module.MAX_PROBES}"),
        ([("probe", f"{PERSON}=" + "y" * app_module.MAX_PROBE_CHARS)], f"at most {app_module.MAX_PROBE_CHARS}"),
        ([("q", "beach " * 400)], f"at most {app_module.MAX_QUERY_CHARS:,}"),
    ],
)
@pytest.mark.parametrize("route", ["/api/search", "/api/images/0/similar", "/api/search/image"])
def test_too_many_or_too_long_filters_are_400_naming_the_limit(client, params, limit, route):
    if route != "/api/search/image":
        response = client.get(route, params=[("q", "beach"), *params])
    else:
        response = client.post(route, params=params, content=_png((255, 0, 0)), headers={"Content-Type": "image/png"})
    if route.endswith("similar") and params[0][0] == "q":
        assert response.status_code in (200, 400) and "characters" not in response.text, response.text  # more like this takes no query text
        return
    assert response.status_code == 400 and limit in response.json()["error"], response.text[:300]


def test_the_most_filters_allowed_still_answer(client):
    params = [("q", "beach"), ("mode", "semantic")] + [("probe", f"{PERSON}=yes")] * app_module.MAX_PROBES
    assert names(client.get("/api/search", params=params).json()["hits"]) == ["red_car.jpg", "people_beach.jpg"]


def _slow_text_search(index, monkeypatch):
    """Text search that runs a DuckDB query of minutes on the index's own connection (interruptible, as a real one)."""

    def slow(self, query, k, *filters):
        return self._run("SELECT count(*), 0.0 FROM range(1000000000000) AS a(x) WHERE x % 7 = 3", [])

    monkeypatch.setattr(type(index), "_text_ranked", slow)


@pytest.fixture()
def quick(service):
    """A service over the same index whose queries are interrupted after 1 s."""
    return IndexService(service.index, query_timeout=1.0)


def test_a_query_past_the_time_limit_is_interrupted_503_and_the_index_answers_again(quick, thumbs, monkeypatch):
    import time

    client = TestClient(create_app(quick, thumbs))
    with monkeypatch.context() as patched:
        _slow_text_search(quick.index, patched)
        started = time.monotonic()
        response = client.get("/api/search", params={"q": "beach", "mode": "text"})
        assert time.monotonic() - started < 5
    assert response.status_code == 503 and "1 s limit" in response.json()["error"]
    assert response.headers["retry-after"]
    # the lock was released and the connection is usable
    again = client.get("/api/search", params={"q": "beach", "mode": "text"})
    assert again.status_code == 200 and names(again.json()["hits"]) == ["people_beach.jpg", "dog_beach.jpg"]


def test_a_request_that_cannot_get_the_index_in_time_is_503(quick, thumbs):
    client = TestClient(create_app(quick, thumbs))
    quick._lock.acquire()
    try:
        response = client.get("/api/search", params={"q": "beach"})
    finally:
        quick._lock.release()
    assert response.status_code == 503 and "busy" in response.json()["error"]
    assert client.get("/api/search", params={"q": "beach"}).status_code == 200


def test_stopping_interrupts_the_running_query_and_refuses_new_ones(built, thumbs, monkeypatch):
    import threading
    import time

    db, _ = built
    with ImageIndex.open(db) as index:
        service = IndexService(index, query_timeout=60)
        _slow_text_search(index, monkeypatch)
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=_try(service.search, "beach", "text", 0, 5, app_module.Filters())))
        with TestClient(create_app(service, thumbs)) as client:  # the lifespan: shutdown stops the service
            worker.start()
            time.sleep(0.3)
        started = time.monotonic()
        worker.join(timeout=10)
        assert time.monotonic() - started < 3 and not worker.is_alive()
        assert isinstance(result["r"], app_module.Busy) and "stopping" in str(result["r"])
        assert client.get("/api/search", params={"q": "beach"}).status_code == 503


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


# -- image uploads: the page's content type, bounded decodes (issue 14, item 3) --------------------


@pytest.mark.parametrize(
    "kind", [None, "text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "text/html"]
)
def test_an_upload_without_the_pages_content_type_is_415(client, kind):
    """A cross-site no-cors POST can only send the "simple" types: none of them is accepted."""
    headers = {"Content-Type": kind} if kind else {}
    response = client.post("/api/search/image", content=_png((255, 0, 0)), headers=headers)
    assert response.status_code == 415 and "image/*" in response.json()["error"]


@pytest.mark.parametrize("kind", ["image/png", "image/jpeg", "IMAGE/PNG", "application/octet-stream"])
def test_the_types_the_page_sends_are_accepted(client, kind):
    response = client.post("/api/search/image", content=_png((255, 0, 0)), params={"limit": 1}, headers={"Content-Type": kind})
    assert response.status_code == 200 and names(response.json()["hits"]) == ["red_car.jpg"]


def test_decodes_beyond_the_bound_wait_then_get_503(service, thumbs, monkeypatch):
    import threading

    from pipeline import decode

    monkeypatch.setattr(app_module, "MAX_DECODES", 1)
    monkeypatch.setattr(app_module, "UPLOAD_WAIT", 0.3)
    release, entered = threading.Event(), threading.Event()
    real = decode.decode_bytes

    def held(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_bytes", held)
    with TestClient(create_app(service, thumbs)) as client:
        first = []
        worker = threading.Thread(target=lambda: first.append(client.post("/api/search/image", content=_png((255, 0, 0)), headers=PNG)))
        worker.start()
        assert entered.wait(10)
        second = client.post("/api/search/image", content=_png((255, 0, 0)), headers=PNG)
        assert second.status_code == 503 and "decoded already" in second.json()["error"]
        release.set()
        worker.join(10)
        assert first[0].status_code == 200
        assert client.post("/api/search/image", content=_png((255, 0, 0)), headers=PNG).status_code == 200  # released


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_a_large_query_image_is_reduced_early_to_what_the_pipeline_decodes(mode):
    import numpy as np

    from pipeline.config import DecodeConfig
    from pipeline.decode import decode_bytes

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 6500, 4), dtype=np.uint8)  # 6500 px: reduced by 2 before the resize to 1024
    image = Image.fromarray(pixels, "RGBA").convert(mode) if mode != "P" else Image.fromarray(pixels[..., :3], "RGB").quantize(64)
    out = io.BytesIO()
    image.save(out, "PNG")
    pipeline = decode_bytes("x.png", out.getvalue(), DecodeConfig())
    query = decode_bytes("x.png", out.getvalue(), DecodeConfig(), reduce_early=True)
    assert query.ok and query.image.size == pipeline.image.size == (1024, 6) and query.image.mode == "RGB"
    assert (query.width, query.height) == (pipeline.width, pipeline.height) == (6500, 40)
    diff = np.abs(np.asarray(query.image, dtype=int) - np.asarray(pipeline.image, dtype=int))
    if mode in ("RGB", "L", "P"):
        assert diff.max() == 0  # the reduction the resize does anyway, done earlier (P is not reduced early)
    else:
        assert diff.mean() < 2  # alpha composited after rather than before the reduction


def test_a_query_started_after_the_deadline_passed_in_python_is_interrupted_too(quick, thumbs, monkeypatch):
    """The deadline passing while no query runs (the embedder, say) still stops the request's next query."""
    import time

    def embed_then_slow(self, query, k, *filters):
        time.sleep(1.3)  # past quick's 1 s limit, outside DuckDB: that interrupt is a no-op
        return self._run("SELECT count(*), 0.0 FROM range(1000000000000) AS a(x) WHERE x % 7 = 3", [])

    monkeypatch.setattr(type(quick.index), "_text_ranked", embed_then_slow)
    started = time.monotonic()
    response = TestClient(create_app(quick, thumbs)).get("/api/search", params={"q": "beach", "mode": "text"})
    assert response.status_code == 503 and "limit" in response.json()["error"]
    assert time.monotonic() - started < 5


def test_requests_waiting_for_the_index_get_it_in_arrival_order():
    """threading.Lock let newcomers overtake: under 32 waiting requests some waited 3 s while the mean was 0.6 s."""
    import threading
    import time

    from pipeline.serve.service import FairLock

    lock, order, threads = FairLock(), [], []
    assert lock.acquire(timeout=1)
    for n in range(8):
        def wait_turn(n=n):
            assert lock.acquire(timeout=10)
            order.append(n)
            lock.release()

        threads.append(threading.Thread(target=wait_turn))
        threads[-1].start()
        time.sleep(0.05)  # arrive one after the other
    assert not lock.acquire(timeout=0.05)  # held: a waiter whose time runs out gives up
    lock.release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == list(range(8))
    assert lock.acquire(timeout=0.1)  # free again once everyone had a turn
    lock.release()
