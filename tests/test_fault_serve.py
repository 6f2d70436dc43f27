"""Fault scenarios of `captioner serve` (issue 14): a server beside a rebuild, and a bounded load with abuse.

Both start `captioner serve` as a user does (tests/fixtures/faults.py's tagged
``Captioner``: ``python -m pipeline.cli serve ...`` in its own session) over an
index that `captioner index` built from crafted Parquet: rows embedded with
the tiny open_clip model (so hybrid and image search work), uris on small PNG
files (so thumbnails are made), two probes (so probe filters apply). Requests
go over real HTTP on loopback from a thread pool (stdlib http.client).

1. beside a rebuild: while requests run, `captioner index` rebuilds the same
   --db twice with more rows; no request fails, each answer comes whole from
   one index (its hit count is the row count that answer reports), the new
   rows are answered within a few seconds without a restart, the server stops
   within 5 s of SIGTERM and leaves no process.
2. load and abuse: 2,000 mixed requests at 32 at a time, with the abusive ones
   of issue 14 items 2, 3 and 10 mixed in; no 5xx, none over 2 s, the server's
   RSS grows by under 200 MB, SIGTERM stops it within 5 s.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import re
import signal
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import rows as row_factory
from tests.fixtures.faults import Captioner, assert_no_process_left
from tests.search_data import PERSON, PROBES, run_metadata

pytestmark = pytest.mark.subprocess

CAPTION_WORD = "photo"  # in every caption: a text search for it finds every searchable row
REFRESH_BOUND_S = 5.0  # a rebuilt index answers within this (one look per second, then the reopen)
STOP_BOUND_S = 5.0


# -- the index: crafted rows on real PNG files, embedded "by" the tiny open_clip ----------


def _png(color, size=(24, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def write_batch(folder: Path, name: str, start: int, count: int, embed_spec: str) -> Path:
    """Rows ``start .. start+count`` as one Parquet file ``name``, each on its own small PNG under folder/photos."""
    from pipeline.models.identity import model_identity
    from pipeline.probes import answer_as_bool

    from examples.tiny_models import TINY_CLIP_DIM

    ident = model_identity(embed_spec, "embed")
    run = run_metadata(embed_model=ident.model, revision=ident.revision, dim=TINY_CLIP_DIM)
    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    written = []
    for i in range(start, start + count):
        color = ("red", "green", "blue")[i % 3]
        path = photos / f"img_{i:05d}.png"
        path.write_bytes(_png(((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)))
        vector = rng.normal(size=TINY_CLIP_DIM).astype(np.float32)
        answers = ["yes" if i % 2 else "no", color]
        written.append(row_factory.row(
            str(path), run=run, image_id=f"{i:064x}", bytes=path.stat().st_size, format="PNG", width=24, height=16,
            caption=f"a {CAPTION_WORD} of item {i}, a {color} thing", embedding=(vector / np.linalg.norm(vector)).tolist(),
            probes=[{"question": q, "answer": a, "answer_bool": answer_as_bool(q, a)} for q, a in zip(PROBES, answers)],
        ))  # fmt: skip
    parquet = folder / name
    row_factory.write(parquet, written, run)
    return parquet


def captioner_index(db: Path, parquets: list[Path], log: Path) -> None:
    """`captioner index PARQUET... --db DB`, as a user rebuilds an index."""
    with Captioner("index", *parquets, "--db", db, log=log) as command:
        code = command.wait(timeout_s=120)
        assert code == 0, command.output()[-3000:]


# -- the server --------------------------------------------------------------------------


class Served:
    """A running `captioner serve` and plain HTTP to it."""

    def __init__(self, command: Captioner, host: str, port: int):
        self.command, self.host, self.port = command, host, port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=30):
        """(status, parsed JSON or raw bytes, seconds)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        started = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        took = time.monotonic() - started
        if response.getheader("content-type", "").startswith("application/json"):
            return response.status, json.loads(data), took
        return response.status, data, took

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)


def start_serve(db: Path, tmp_path: Path, embed_spec: str) -> Served:
    command = Captioner(
        "serve", "--index", db, "--port", "0", "--device", "cpu", "--embed-model", embed_spec,
        "--thumb-cache", tmp_path / "thumbs", log=tmp_path / "serve.log",
    )  # fmt: skip
    try:
        found = []
        command.wait_for(lambda: found.append(re.search(r"at http://(\S+?):(\d+)/", command.output())) or found[-1],
                         90, "the server to announce its address")
        served = Served(command, found[-1].group(1).strip("[]"), int(found[-1].group(2)))
        # uvicorn binds the port again after the announcement
        command.wait_for(lambda: _answers(served), 30, "the server to answer /api/info")
        return served
    except BaseException:
        command.__exit__(None, None, None)
        raise


def _answers(served: Served) -> bool:
    try:
        return served.get("/api/info", timeout=5)[0] == 200
    except OSError:
        return False


def stop_within_bound(served: Served) -> None:
    """SIGTERM stops the server within STOP_BOUND_S, and nothing of it is left 10 s later."""
    started = time.monotonic()
    served.command.signal(signal.SIGTERM)
    code = served.command.wait(timeout_s=30)
    took = time.monotonic() - started
    assert took < STOP_BOUND_S, f"serve took {took:.1f} s to stop after SIGTERM:\n{served.command.output()[-2000:]}"
    # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status says "terminated"
    assert code in (0, -signal.SIGTERM), (code, served.command.output()[-2000:])
    assert "Traceback" not in served.command.output(), served.command.output()[-3000:]
    assert_no_process_left(served.command.tag)


def everything(served: Served, mode: str = "text") -> dict:
    """A search whose answer lists every searchable row of the index that answered it."""
    status, page, _ = served.get(f"/api/search?q={CAPTION_WORD}&mode={mode}&limit=1000")
    assert status == 200, page
    return page


@pytest.fixture()
def embed_spec(tiny_clip_dir) -> str:
    return f"open_clip:{tiny_clip_dir}"


# -- 1. a server beside a rebuild ----------------------------------------------------------


def test_a_server_beside_two_rebuilds_answers_every_request_whole_and_sees_the_new_rows(tmp_path, embed_spec):
    batches = [write_batch(tmp_path, "a.parquet", 0, 200, embed_spec), write_batch(tmp_path, "b.parquet", 200, 20, embed_spec),
               write_batch(tmp_path, "c.parquet", 220, 20, embed_spec)]  # fmt: skip
    db = tmp_path / "index.duckdb"
    captioner_index(db, batches[:1], tmp_path / "index0.log")
    served = start_serve(db, tmp_path, embed_spec)
    with served.command:
        assert len(everything(served)["hits"]) == 200
        answers, stop = [], threading.Event()

        def load(worker: int) -> None:
            rng = random.Random(worker)
            while not stop.is_set():
                kind = rng.choice(["text", "hybrid", "info", "image", "thumb", "filtered"])
                try:
                    if kind in ("text", "hybrid"):
                        status, page, _ = served.get(f"/api/search?q={CAPTION_WORD}&mode={kind}&limit=1000")
                        if kind == "text" and status == 200:  # one whole index: every row it says it has
                            assert len(page["hits"]) == page["index"]["searchable_rows"], page["index"]
                    elif kind == "filtered":
                        probe = urllib.parse.quote(f"{PERSON}=yes")
                        status, page, _ = served.get(f"/api/search?q={CAPTION_WORD}&mode=text&limit=1000&probe={probe}")
                        if status == 200:
                            assert len(page["hits"]) == page["index"]["searchable_rows"] // 2, page["index"]
                    elif kind == "info":
                        status, page, _ = served.get("/api/info")
                    elif kind == "image":
                        status, page, _ = served.get(f"/api/images/{rng.randrange(200)}")
                    else:
                        status, page, _ = served.get(f"/api/images/{rng.randrange(200)}/thumb?size=s")
                    answers.append((kind, status, page if status >= 400 else None))
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    answers.append((kind, repr(exc), None))

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(load, n) for n in range(4)]
            try:
                for rebuild, rows in ((2, 220), (3, 240)):
                    captioner_index(db, batches[:rebuild], tmp_path / f"index{rebuild}.log")
                    deadline = time.monotonic() + REFRESH_BOUND_S
                    while len((page := everything(served))["hits"]) != rows:
                        assert time.monotonic() < deadline, (
                            f"the server still answers {len(page['hits'])} rows {REFRESH_BOUND_S} s after the rebuild "
                            f"to {rows} rows:\n{served.command.output()[-2000:]}"
                        )
                        time.sleep(0.1)
                    assert page["index"]["searchable_rows"] == rows, page["index"]
                    time.sleep(1.0)  # keep the load running on the new index
            finally:
                stop.set()
                for worker in workers:
                    worker.result()

        failed = [a for a in answers if a[1] != 200]
        assert len(answers) > 50 and not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
        info = served.get("/api/info")[1]
        assert (info["rows"], info["generation"]) == (240, 3), info
        log = served.command.output()
        assert log.count("index refreshed") == 2, log[-2000:]
        stop_within_bound(served)


# -- 2. a bounded load with abuse mixed in ---------------------------------------------------

LOAD_REQUESTS = 2000
LOAD_CONCURRENCY = 32
LATENCY_BOUND_S = 2.0
# The 9999 x 9999 upload is not refused (it is within decode.max_pixels): it is
# decoded, 100 M pixels, about a second of one core here with nothing else
# running (measured 0.7-1.4 s), 2.2 s under this load. Its bound is how long
# an upload may wait for a decode slot (pipeline.serve.app.UPLOAD_WAIT).
SLOW_BY_NATURE = {"huge-png"}
RSS_GROWTH_BOUND = 200 * 2**20


def _huge_png() -> bytes:
    """A 9999 x 9999 PNG (just under decode.max_pixels): 460 KB on the wire, 100 M pixels decoded."""
    out = io.BytesIO()
    Image.new("L", (9999, 9999), 200).save(out, "PNG", compress_level=1)
    return out.getvalue()


def request_mix(port: int, rows: int, seed: int = 0) -> list[tuple[str, str, str, bytes | None, dict, set[int]]]:
    """LOAD_REQUESTS requests as (kind, method, path, body, headers, statuses expected), shuffled.

    The usual ones of a page (searches of each mode, filtered, image views,
    thumbnails, more like this, uploads, the page and its script) and, mixed in,
    the abusive ones of issue 14 items 2, 3 and 10, each refused or answered
    within its bound.
    """
    rng = random.Random(seed)
    small, huge = _png((200, 30, 30)), _huge_png()
    person, car = urllib.parse.quote(f"{PERSON}=yes"), urllib.parse.quote(f"{PROBES[1]}=red")
    words = [CAPTION_WORD, "red thing", "green", "item 42", "blue photo", "nothing like it"]

    def q() -> str:
        return urllib.parse.quote(rng.choice(words))

    usual = {
        "text": lambda: ("GET", f"/api/search?q={q()}&mode=text", None, {}, {200}),
        "hybrid": lambda: ("GET", f"/api/search?q={q()}&mode=hybrid", None, {}, {200}),
        "semantic": lambda: ("GET", f"/api/search?q={q()}&mode=semantic", None, {}, {200}),
        "filtered": lambda: ("GET", f"/api/search?q={q()}&mode=hybrid&probe={person}&probe={car}", None, {}, {200}),
        "more": lambda: ("GET", f"/api/search?q={q()}&offset=48&limit=48", None, {}, {200}),
        "image": lambda: ("GET", f"/api/images/{rng.randrange(rows)}", None, {}, {200}),
        "similar": lambda: ("GET", f"/api/images/{rng.randrange(rows)}/similar", None, {}, {200}),
        "thumb": lambda: ("GET", f"/api/images/{rng.randrange(rows)}/thumb?size={rng.choice('sl')}", None, {}, {200}),
        "upload": lambda: ("POST", "/api/search/image", small, {"Content-Type": "image/png"}, {200}),
        "info": lambda: ("GET", "/api/info", None, {}, {200}),
        "page": lambda: ("GET", rng.choice(["/", "/static/app.js", "/static/style.css"]), None, {}, {200}),
    }
    abusive = {
        "many-probes": lambda: ("GET", "/api/search?q=x&" + "&".join([f"probe={person}"] * 400), None, {}, {400}),
        "long-probe": lambda: ("GET", "/api/search?q=x&probe=" + "Q" * 5000 + "%3Dyes", None, {}, {400}),
        "long-q": lambda: ("GET", "/api/search?q=" + "beach%20" * 3000, None, {}, {400}),
        "huge-png": lambda: ("POST", "/api/search/image", huge, {"Content-Type": "image/png"}, {200}),
        "wrong-type": lambda: ("POST", "/api/search/image", small, {"Content-Type": "text/plain"}, {415}),
        "huge-id": lambda: ("GET", "/api/images/" + "9" * 5000, None, {}, {404}),
        "huge-id-thumb": lambda: ("GET", "/api/images/" + "7" * 5000 + "/thumb", None, {}, {404}),
        "ipv6-host": lambda: ("GET", "/api/info", None, {"Host": f"[::1]:{port}"}, {200}),
        "foreign-host": lambda: ("GET", "/api/info", None, {"Host": "evil.example"}, {400}),
        "zero-confidence": lambda: ("GET", f"/api/search?q=x&probe={person}&confidence=0", None, {}, {400}),
        "traversal": lambda: ("GET", "/static/..%2f..%2fetc%2fpasswd", None, {}, {404}),
    }
    # About one request in eight is abusive; the 9999x9999 upload (a second of decoding) only a few times.
    counts = {"huge-png": 4}
    mix = [("huge-png", *abusive["huge-png"]()) for _ in range(counts["huge-png"])]
    others = [k for k in abusive if k != "huge-png"]
    mix += [(kind, *abusive[kind]()) for kind in (others * 30)[: LOAD_REQUESTS // 8 - len(mix)]]
    kinds = list(usual)
    mix += [(kind, *usual[kind]()) for kind in rng.choices(kinds, k=LOAD_REQUESTS - len(mix))]
    rng.shuffle(mix)
    return mix


# Others share this machine's 2 cores: at a load average of 14 the slowest usual
# request took 1.8 s, at 20-25 (ten processes per core) 3-4 s, whatever the
# server did. Past this many runnable processes per core, latency is not judged.
OVERLOADED_PER_CORE = 4


def machine_overloaded() -> bool:
    return os.getloadavg()[0] > OVERLOADED_PER_CORE * (os.cpu_count() or 1)


def latency_bound(kind: str) -> float:
    from pipeline.serve.app import UPLOAD_WAIT

    return UPLOAD_WAIT if kind in SLOW_BY_NATURE else LATENCY_BOUND_S


def _warm_up(served: Served, mix) -> None:
    """One request of each kind before timing: the first thumbnail, upload and semantic query load code paths once."""
    seen = set()
    for kind, method, path, body, headers, _ in mix:
        if kind not in seen:
            seen.add(kind)
            served.request(method, path, body=body, headers=headers)


# Beside the other pytest worker's Ray runs (load 3 per core) every in-flight
# request once stalled 5.5 s together: the 2 s bound is judged with the machine to itself.
@pytest.mark.alone
def test_a_bounded_load_with_abuse_mixed_in_gets_no_5xx_and_no_slow_answer(tmp_path, embed_spec):
    import psutil

    db = tmp_path / "index.duckdb"
    captioner_index(db, [write_batch(tmp_path, "a.parquet", 0, 200, embed_spec)], tmp_path / "index.log")
    served = start_serve(db, tmp_path, embed_spec)
    with served.command:
        mix = request_mix(served.port, rows=200)
        # The query embedder is loaded before the server announces itself; the
        # first request of each kind still pays for lazy imports: warm up first.
        _warm_up(served, mix)
        process = psutil.Process(served.command.pid)
        rss_before = process.memory_info().rss

        def send(item):
            kind, method, path, body, headers, expected = item
            try:
                status, _, took = served.request(method, path, body=body, headers=headers, timeout=30)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                return kind, repr(exc), expected, float("inf")
            return kind, status, expected, took

        started = time.monotonic()
        with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            results = list(pool.map(send, mix))
        wall = time.monotonic() - started
        rss_growth = process.memory_info().rss - rss_before

        assert len(results) == LOAD_REQUESTS
        server_errors = [r for r in results if not isinstance(r[1], int) or r[1] >= 500]
        assert not server_errors, f"{len(server_errors)} failed or 5xx, e.g. {server_errors[:5]}"
        unexpected = [r for r in results if r[1] not in r[2]]
        assert not unexpected, f"{len(unexpected)} answered other than expected, e.g. {unexpected[:5]}"
        assert rss_growth < RSS_GROWTH_BOUND, f"the server's RSS grew by {rss_growth / 2**20:.0f} MB"
        usual = [r[3] for r in results if r[0] not in SLOW_BY_NATURE]
        print(f"{LOAD_REQUESTS} requests in {wall:.1f} s, slowest {max(usual):.2f} s "
              f"(the 9999x9999 upload: {max(r[3] for r in results if r[0] in SLOW_BY_NATURE):.2f} s), "
              f"server RSS +{rss_growth / 2**20:.0f} MB, load average {os.getloadavg()[0]:.1f}")
        stop_within_bound(served)
        slow = sorted((r for r in results if r[3] > latency_bound(r[0])), key=lambda r: -r[3])
        if slow and machine_overloaded():
            pytest.skip(f"every other check held, but {len(slow)} requests took over their bound while the machine's "
                        f"load average was {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores: latency says nothing then")
        assert not slow, f"{len(slow)} requests over their bound (of {wall:.1f} s in all), e.g. {slow[:5]}"
