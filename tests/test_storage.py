"""pipeline.storage: one entry point for sources and outputs, backend errors turned into fixes.

The missing-backend cases run `captioner run` as the user does: gcsfs is not
installed in the test environment at all, and s3fs is hidden from a
subprocess by a sitecustomize that refuses to import it. Neither needs Ray:
the output is opened before anything starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import storage
from pipeline.cli import main
from pipeline.output import OutputError, OutputStore
from pipeline.sources import SourceError, list_images
from tests.fixtures.images import make_jpegs

REPO = Path(__file__).resolve().parents[1]

BLOCK_S3FS = '''
import sys

class _NoS3fs:
    """Behave as if s3fs were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "s3fs" or name.startswith("s3fs."):
            raise ModuleNotFoundError("No module named 's3fs'", name="s3fs")
        return None

sys.meta_path.insert(0, _NoS3fs())
'''


def _gcsfs_installed() -> bool:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def models(tiny_vlm_dir, tiny_clip_dir) -> list[str]:
    # Local models that load: the storage error must be what stops the run.
    return ["--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir)]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    make_jpegs(folder, 2)
    return folder


@pytest.mark.subprocess
def test_out_s3_without_s3fs_is_a_clear_error(photos, tmp_path, models):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_S3FS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(photos), "--out", "s3://some-bucket/out/", *models, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "pip install 'captioner[s3]'" in done.stderr
    assert "s3://some-bucket/out/" in done.stderr


@pytest.mark.subprocess
def test_the_blocker_really_hides_s3fs(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_S3FS)
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    done = subprocess.run([sys.executable, "-c", "import s3fs"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "No module named 's3fs'" in done.stderr


@pytest.mark.skipif(_gcsfs_installed(), reason="gcsfs is installed here")
@pytest.mark.parametrize("where", ["out", "source"])
def test_gs_without_gcsfs_is_a_clear_error_either_side(photos, tmp_path, where, models):
    args = [str(photos), "--out", "gs://some-bucket/out/"] if where == "out" else ["gs://some-bucket/photos", "--out", str(tmp_path / "o.parquet")]
    result = CliRunner().invoke(main, ["run", *args, *models, "--no-progress"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "pip install 'captioner[gcs]'" in result.output


def test_missing_credentials_say_how_to_set_them(s3_bucket, photos, monkeypatch, models):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    from tests.fixtures.s3 import clear_s3fs_instances

    clear_s3fs_instances()
    result = CliRunner().invoke(
        main, ["run", str(photos), "--out", s3_bucket.url("out/"), *s3_bucket.cli_options, *models, "--no-progress"]
    )
    assert result.exit_code == 1, (result.output, result.exception)
    assert "credentials" in result.output and "AWS_ACCESS_KEY_ID" in result.output
    with pytest.raises(SourceError, match="credentials"):
        list_images(s3_bucket.url("photos"), extensions=(".jpg",), storage_options=s3_bucket.storage_options)


def test_missing_output_bucket_names_the_bucket(s3_bucket, photos, models):
    url = "s3://captioner-no-such-bucket-here/out/"
    result = CliRunner().invoke(main, ["run", str(photos), "--out", url, *s3_bucket.cli_options, *models, "--no-progress"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"cannot write to {url}" in result.output and "bucket does not exist" in result.output


def test_errors_are_one_family():
    assert issubclass(SourceError, storage.StorageError) and issubclass(OutputError, storage.StorageError)
    with pytest.raises(SourceError, match="nosuchproto"):
        storage.open_filesystem("nosuchproto://x/y", role="source")
    with pytest.raises(OutputError, match="nosuchproto"):
        OutputStore("nosuchproto://x/y.parquet")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_decoder_and_the_sources_read_the_same_bytes_and_fail_the_same_way(where, tmp_path):
    """Both readers go through one storage layer: same bytes, same errors, locally and on an fsspec store."""
    import hashlib

    import fsspec

    from pipeline import sources
    from pipeline.config import DecodeConfig
    from pipeline.decode import load_image
    data = make_jpegs(tmp_path / "src", 1)[0].read_bytes()
    if where == "local":
        uri, gone = str(tmp_path / "src" / "img_000000.jpg"), str(tmp_path / "src" / "gone.jpg")
    else:
        base = f"memory://storage-test-{uuid.uuid4().hex}"
        fsspec.filesystem("memory").pipe_file(f"{base}/x.jpg", data)
        uri, gone = f"{base}/x.jpg", f"{base}/gone.jpg"
    assert sources.read_bytes(uri) == data and sources.read_bytes(uri, max_bytes=10) == data[:10]
    decoded = load_image(uri, DecodeConfig())
    assert decoded.ok and decoded.image_id == hashlib.sha256(data).hexdigest() and decoded.bytes == len(data)
    with pytest.raises(FileNotFoundError):
        sources.read_bytes(gone)
    assert load_image(gone, DecodeConfig()).error_kind == "missing"


# ---- deadlines and attempts (pipeline/storage_limits.py) ------------------------------


def test_every_bucket_filesystem_gets_a_deadline_and_bounded_attempts():
    from pipeline import storage_limits

    fs, _ = storage.open_filesystem("s3://bucket/photos", {"endpoint_url": "http://127.0.0.1:1"})
    limits = storage_limits.Limits()
    assert fs.config_kwargs["connect_timeout"] == fs.config_kwargs["read_timeout"] == limits.timeout_s
    assert fs.config_kwargs["retries"] == {"max_attempts": limits.attempts, "mode": "standard"}
    assert fs.retries == 1  # no s3fs retry loop around botocore's
    # captioner's own keys set the policy and never reach the backend.
    fs, _ = storage.open_filesystem("s3://bucket/photos", {"timeout_s": "1.5", "attempts": "2"})
    assert fs.config_kwargs["read_timeout"] == 1.5 and fs.config_kwargs["retries"]["max_attempts"] == 2
    assert "timeout_s" not in fs.storage_options and "attempts" not in fs.storage_options
    with pytest.raises(storage.SourceError, match="timeout_s=soon is not a positive number"):
        storage.open_filesystem("s3://bucket/photos", {"timeout_s": "soon"})


def test_the_stated_bound_is_the_one_applied_and_the_readme_states_it():
    from pipeline.storage_limits import Limits

    assert Limits(timeout_s=10, attempts=3).waited_for_s == 3 * 2 * 10 + (1 + 2)
    assert Limits(timeout_s=1.5, attempts=1).waited_for_s == 3
    default = Limits()
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"times out after {default.timeout_s:g} s" in readme and f"tried {default.attempts} times" in readme
    assert f"at most {default.waited_for_s:g} s" in readme


def test_timeouts_refusals_and_full_disks_are_told_apart_from_bad_files():
    ReadTimeoutError = type("ReadTimeoutError", (Exception,), {})
    EndpointConnectionError = type("EndpointConnectionError", (Exception,), {})
    assert storage.is_unavailable(ReadTimeoutError("Read timeout on endpoint URL"))
    assert storage.is_unavailable(ConnectionRefusedError(111, "Connection refused"))
    wrapped = RuntimeError("decode failed")
    wrapped.__cause__ = EndpointConnectionError("Could not connect")
    assert storage.is_unavailable(wrapped)
    assert not storage.is_unavailable(FileNotFoundError(2, "No such file"))
    assert not storage.is_unavailable(PermissionError(13, "Permission denied"))

    assert storage.is_full_disk(OSError(28, "No space left on device"))
    assert storage.is_full_disk(RuntimeError('IO Error: Could not write file "x.duckdb": No space left on device'))
    assert not storage.is_full_disk(OSError(5, "Input/output error"))
    assert storage.full_disk_fix(OSError(28, "No space left on device"), "/data") == "free space on /data"
    assert "writable" in storage.full_disk_fix(OSError(30, "Read-only file system"), "/data")

    error = storage.explain(ReadTimeoutError("Read timeout"), "s3://b/photos", doing="list",
                            storage_options={"endpoint_url": "http://10.0.0.9:9000", "timeout_s": "4"})
    assert error.outage and "http://10.0.0.9:9000 did not answer" in str(error) and "after 4 s" in str(error)
    assert not storage.explain(PermissionError(13, "denied"), "s3://b/photos", doing="list").outage


def test_a_storage_outage_exits_3_and_any_other_storage_error_1():
    from pipeline import exit_codes
    from pipeline.options import storage_failure

    down = storage.SourceError("down")
    down.outage = True
    assert storage_failure(down).exit_code == exit_codes.STORAGE_FAILED == 3
    assert storage_failure(storage.SourceError("no such bucket")).exit_code == exit_codes.FAILED == 1


def test_the_bar_says_what_it_waits_for_when_no_row_comes():
    import io

    from tqdm import tqdm

    from jobs.run_faults import WaitingNote

    bar = tqdm(total=3, file=io.StringIO(), disable=False)
    note = WaitingNote(bar, {"timeout_s": "0.2", "attempts": "2"}, remote=True)
    note.start()
    try:
        deadline = time.monotonic() + 10
        while "waiting for rows" not in (bar.postfix or "") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        note.stop()
    assert "waiting for rows: none for" in bar.postfix and "times out after 0.2 s" in bar.postfix, bar.postfix
    assert not note._thread.is_alive()
    bar.close()


def test_once_a_store_refuses_a_decode_worker_stops_asking_it(monkeypatch):
    """Each read that fails so would wait out the deadline again: the rest of the worker's images
    become 'storage' rows at once, naming the read that failed."""
    import socket
    from types import SimpleNamespace

    from pipeline.config import DecodeConfig
    from pipeline.stages import decode as decode_stage
    from tests.fixtures.s3 import set_fake_aws_env

    set_fake_aws_env(monkeypatch)
    monkeypatch.setattr(decode_stage, "_STORAGE_DOWN", {})
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    options = {"endpoint_url": endpoint, "timeout_s": "1", "attempts": "1"}
    stage = SimpleNamespace(run=SimpleNamespace(decode=DecodeConfig()))
    started = time.monotonic()
    rows = decode_stage._load_all([f"s3://b/{i}.jpg" for i in range(3)], stage, options)
    assert [r.error_kind for r in rows] == ["storage"] * 3
    assert "EndpointConnectionError" in rows[0].error and "not read: the storage failed on s3://b/0.jpg" in rows[2].error
    assert time.monotonic() - started < 10


def test_the_readme_lists_every_exit_code():
    from pipeline import exit_codes

    readme = (REPO / "README.md").read_text()
    for code in exit_codes.MEANINGS:
        assert f"\n| {code} |" in readme, f"exit code {code} is not in the README's table"
