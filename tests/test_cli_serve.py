"""`captioner serve` on first contact: a busy port fails at once, --embed-model is accepted."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.search import ImageIndex, build_index
from tests import search_doubles
from tests.serve_support import crafted_images_index

search_doubles.register()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_cli")
    parquet, _ = crafted_images_index(folder)
    build_index([parquet], folder / "index.duckdb")
    return folder / "index.duckdb"


@pytest.fixture()
def uvicorn_runs(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    return calls


@pytest.fixture()
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_a_busy_port_fails_at_once_naming_port_before_anything_loads(db, busy_port, uvicorn_runs, monkeypatch, tmp_path):
    def build(self):
        raise AssertionError("the embedder was loaded before the port was bound")

    monkeypatch.setattr(ImageIndex, "_build_embedder", build)
    result = CliRunner().invoke(main, ["serve", "--index", str(db), "--port", str(busy_port),
                                       "--thumb-cache", str(tmp_path / "t")])
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"port {busy_port}" in result.output and "already in use" in result.output and "--port" in result.output
    assert "serving" not in result.output and "loading" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not uvicorn_runs


def test_the_port_is_announced_after_it_is_bound(db, uvicorn_runs, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(main, ["serve", "--index", str(db), "--port", str(port), "--thumb-cache", str(tmp_path / "t")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"http://127.0.0.1:{port}/" in result.output
    assert [(c["host"], c["port"]) for c in uvicorn_runs] == [("127.0.0.1", port)]


def test_port_zero_announces_the_port_it_got(db, uvicorn_runs, tmp_path):
    result = CliRunner().invoke(main, ["serve", "--index", str(db), "--port", "0", "--thumb-cache", str(tmp_path / "t")])
    assert result.exit_code == 0, (result.output, result.exception)
    (call,) = uvicorn_runs
    assert call["port"] != 0 and f"http://127.0.0.1:{call['port']}/" in result.output


def test_serve_accepts_embed_model_like_search(db, uvicorn_runs, tmp_path):
    """The message that tells the user to pass --embed-model can be followed on serve too."""
    missing = tmp_path / "moved_model"
    args = ["serve", "--index", str(db), "--port", "0", "--thumb-cache", str(tmp_path / "t")]
    result = CliRunner().invoke(main, [*args, "--embed-model", f"open_clip:{missing}"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert str(missing) in result.output  # the given model was the one tried (and is reported missing)
    result = CliRunner().invoke(main, [*args, "--embed-model", search_doubles.SPEC])
    assert result.exit_code == 0 and "warning" not in result.output, result.output


# A real `captioner serve` whose text search runs a DuckDB query of minutes (as 500 probe filters once did).
_SLOW_SERVER = """
import sys
from tests import search_doubles
search_doubles.register()
from pipeline.search import ImageIndex
def slow(self, query, k, *filters):
    return self._run("SELECT count(*), 0.0 FROM range(1000000000000) AS a(x) WHERE x % 7 = 3", [])
ImageIndex._text_ranked = slow
from pipeline.cli import main
main(sys.argv[1:])
"""


def _start_server(db, tmp_path, *extra, script=_SLOW_SERVER):
    import re
    import subprocess
    import sys
    import time
    from pathlib import Path

    log = tmp_path / "serve.log"
    root = Path(__file__).resolve().parent.parent
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", script, "serve", "--index", str(db), "--port", "0", "--device", "cpu",
             "--thumb-cache", str(tmp_path / "t"), *extra],
            stdout=sink, stderr=subprocess.STDOUT, cwd=root,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (found := re.search(r"at http://(\S+?):(\d+)/", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"captioner serve did not start:\n{log.read_text()}")
        time.sleep(0.1)
    time.sleep(0.3)  # uvicorn binds the port again after the announcement
    return process, found.group(1).strip("[]"), int(found.group(2)), log


@pytest.mark.subprocess
def test_sigterm_stops_the_server_within_seconds_while_a_query_runs(db, tmp_path):
    import http.client
    import signal
    import threading
    import time

    process, host, port, log = _start_server(db, tmp_path)
    try:
        answers = []

        def ask():
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                conn.request("GET", "/api/search?q=beach&mode=text")
                answers.append(conn.getresponse().status)
            except OSError as exc:
                answers.append(exc)
            finally:
                conn.close()

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        time.sleep(1.0)
        assert not answers, answers  # the query is running
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        assert time.monotonic() - started < 5, log.read_text()
        asker.join(timeout=5)
        assert answers and answers[0] != 200
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


_PLAIN_SERVER = """
import sys
from tests import search_doubles
search_doubles.register()
from pipeline.cli import main
main(sys.argv[1:])
"""


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.subprocess
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_serve_on_ipv6_loopback_answers_the_browsers_host_header(db, tmp_path):
    """`captioner serve --host ::1`: a browser sends ``Host: [::1]:PORT``, and so does http.client."""
    import http.client

    process, host, port, log = _start_server(db, tmp_path, "--host", "::1", script=_PLAIN_SERVER)
    try:
        assert host == "::1"
        conn = http.client.HTTPConnection("::1", port, timeout=10)
        try:
            conn.request("GET", "/api/info")  # Host: [::1]:PORT
            response = conn.getresponse()
            assert response.status == 200, (response.read()[:300], log.read_text())
            response.read()
            conn.request("GET", "/api/info", headers={"Host": "evil.example"})
            assert conn.getresponse().status == 400
        finally:
            conn.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
