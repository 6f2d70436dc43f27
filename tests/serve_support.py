"""Helpers for the `captioner serve` tests: a crafted index over real image files, a live server.

``crafted_images_index`` writes the crafted search rows of tests/search_data.py
with uris pointing at real files (one EXIF-rotated JPEG, a PNG, a missing
file, a corrupt file) so thumbnails have originals to read.
``LiveServer`` runs the app on uvicorn in a thread, on a free loopback port,
for the browser test and for raw HTTP requests that no client library would
normalise (``/static/../x``).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

from PIL import Image

from tests.fixtures.images import oriented_jpeg
from tests.search_data import CRAFTED, ERROR_URI, error_row, ok_row, run_metadata, write_rows

# crafted name -> how its original file is made
ROTATED = "dog_beach.jpg"  # stored turned, EXIF orientation 6: upright it is 96 x 48
MISSING = "red_car.jpg"  # never written
CORRUPT = "people_beach.jpg"  # bytes that are not an image


def write_originals(folder: Path) -> dict[str, Path]:
    """The image files behind the crafted rows; name -> path (the missing one too)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for uri in CRAFTED:
        name = uri.rsplit("/", 1)[-1]
        path = folder / name
        paths[name] = path
        if name == ROTATED:
            path.write_bytes(oriented_jpeg(6))
        elif name == CORRUPT:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 4)
        elif name != MISSING:
            Image.new("RGB", (400, 300), (30, 120, 200)).save(path)
    return paths


def crafted_images_index(folder: Path):
    """Parquet with the crafted rows, uris on real files under ``folder``; returns (parquet, {name: path})."""
    paths = write_originals(folder / "photos")
    run = run_metadata()
    rows = []
    for uri, (caption, person, car, embedding) in CRAFTED.items():
        name = uri.rsplit("/", 1)[-1]
        rows.append(ok_row(str(paths[name]), caption, [person, car], embedding, run=run))
    rows.append(error_row(str(folder / "photos" / ERROR_URI.rsplit("/", 1)[-1]), run=run))
    parquet = folder / "captions.parquet"
    write_rows(parquet, rows, run)
    return parquet, paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app on uvicorn in a background thread; ``with LiveServer(app) as server: server.url``."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.host = host
        self.port = free_port()
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def raw_get(self, path: str, host: str | None = None) -> tuple[int, bytes]:
        """GET ``path`` exactly as written (no client-side normalisation of '..' or escapes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host or f"{self.host}:{self.port}")
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
