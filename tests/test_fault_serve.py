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
