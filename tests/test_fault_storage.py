"""The fault suite, storage: a store that stalls or refuses at chosen moments (a disk that fills: tests/test_fault_disk.py).

Every scenario runs real ``captioner`` processes (tests/fixtures/faults.py)
and ends with the suite's five verdicts: no file of the user's touched,
every image exactly once after the rerun, a one-line message, an exit code
that tells the truth (pipeline.exit_codes), no process left after 10 s.

The store is moto's server in a child process (tests/fixtures/s3.py
``stoppable_s3``), frozen with SIGSTOP (it accepts connections and never
answers) or killed (connection refused). Deadlines are set small through
``--storage-option timeout_s=... attempts=...`` so a stall is seconds, not
the users' default minute.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import exit_codes
from tests.fixtures.faults import (
    EMBED_ONLY,
    assert_each_image_once,
    assert_one_line_error,
    assert_untouched,
    captioner_run,
    finish,
    snapshot,
)
from tests.fixtures.images import make_jpegs

pytestmark = pytest.mark.subprocess

# A stalled request fails after 2 attempts x 2 x 1.5 s (connect, answer) + 1 s backoff: 7 s at most.
FAST_DEADLINE = ["--storage-option", "timeout_s=1.5", "--storage-option", "attempts=2"]


def _upload(bucket, tmp_path: Path, n: int) -> list[str]:
    paths = make_jpegs(tmp_path / "jpegs", n)
    urls = []
    for i, path in enumerate(paths):
        key = f"photos/img_{i:03d}.jpg"
        bucket.put(key, path.read_bytes())
        urls.append(bucket.url(key))
    return urls


def _bucket_snapshot(bucket) -> dict[str, bytes]:
    return {key: bucket.get(key) for key in bucket.keys("photos/")}


# ---- storage stalled -------------------------------------------------------------------


def test_a_store_that_stops_answering_mid_run_fails_it_in_bounded_time(stoppable_s3, tmp_path, tiny_clip_dir):
    """Frozen (SIGSTOP), then gone (killed), after the listing, while the workers read: each run ends
    within the stated deadline with one line and exit 3; committed rows stay; the rerun completes.
    (Both moments over one collection, the second starting from what the first left: a first run
    and a rerun for each paid two more real runs for the same verdicts.)"""
    bucket = stoppable_s3.bucket()
    urls = _upload(bucket, tmp_path, 8)
    originals = _bucket_snapshot(bucket)
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("the user's own file\n")
    out = out_dir / "captions.parquet"
    args = [bucket.url("photos"), "--out", out, "--embed-model", tiny_clip_dir, *EMBED_ONLY, *bucket.cli_options, *FAST_DEADLINE]

    with captioner_run(tmp_path, "first", *args, "--limit", 3) as first:
        assert finish(first)[0] == exit_codes.OK
    finished = snapshot(out_dir)

    for moment in ("stalled", "refusing"):
        before = snapshot(out_dir)
        with captioner_run(tmp_path, f"failing-{moment}", *[a for a in args if a != "--no-progress"]) as failing:
            failing.wait_for(lambda: "images listed" in failing.output(), 120, "the listing")
            stopped = time.monotonic()
            if moment == "stalled":
                stoppable_s3.freeze()
            else:
                stoppable_s3.kill()
            code, output = finish(failing)
            waited = time.monotonic() - stopped
        assert code == exit_codes.STORAGE_FAILED, (moment, output[-3000:])
        line = assert_one_line_error(output, bucket.endpoint, "rerun")
        assert "rows" in line and "kept" in line, (moment, line)
        # The deadline is 7 s; the rest is Ray's start, the model's load and the shutdown, up to a minute or
        # more on a loaded machine. Without a deadline the run hung for 541 s before it was killed.
        assert waited < 150, f"{moment}: the run took {waited:.0f} s to give up"
        if moment == "stalled":
            assert "waiting for rows" in output, output[-3000:]
        # The finished file of the first run is as it was (nothing was merged into it).
        assert_untouched(before, out_dir, ours=("captions.parquet.parts/", "captions.config.json"))

        if moment == "stalled":
            stoppable_s3.thaw()
        else:
            stoppable_s3.start()  # the same endpoint back, with the same objects
            bucket = stoppable_s3.bucket(bucket.name)
            for key, data in originals.items():
                bucket.put(key, data)
    with captioner_run(tmp_path, "rerun", *args) as rerun:
        code, output = finish(rerun)
    assert code == exit_codes.OK, output[-3000:]
    assert_each_image_once(out, urls)
    assert _bucket_snapshot(bucket) == originals
    assert_untouched({k: v for k, v in finished.items() if k != "captions.parquet"}, out_dir,
                     ours=("captions.parquet", "captions.config.json"))


def test_a_gone_endpoint_at_listing_is_one_line_naming_it(stoppable_s3, tmp_path, tiny_clip_dir):
    bucket = stoppable_s3.bucket()
    _upload(bucket, tmp_path, 2)
    stoppable_s3.kill()
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    before = snapshot(out_dir)
    started = time.monotonic()
    with captioner_run(tmp_path, "refused", bucket.url("photos"), "--out", out_dir / "captions.parquet",
                       "--embed-model", tiny_clip_dir, *EMBED_ONLY, *bucket.cli_options, *FAST_DEADLINE) as refused:
        code, output = finish(refused, 120)
    assert code == exit_codes.STORAGE_FAILED, output[-3000:]
    assert_one_line_error(output, bucket.endpoint, "did not answer", "rerun")
    assert time.monotonic() - started < 60
    assert_untouched(before, out_dir)


def test_an_output_bucket_gone_before_the_commit_is_one_line(stoppable_s3, tmp_path, tiny_clip_dir):
    """Local images, parts to a bucket whose endpoint goes away after the listing: the commit
    fails in one line naming the endpoint, exit 3; with the endpoint back the rerun writes each image once."""
    import pyarrow.parquet as pq

    photos = make_jpegs(tmp_path / "photos", 4)
    before = snapshot(tmp_path / "photos")
    bucket = stoppable_s3.bucket()
    args = [tmp_path / "photos", "--out", bucket.url("out/"), "--embed-model", tiny_clip_dir, *EMBED_ONLY,
            *bucket.cli_options, *FAST_DEADLINE]
    with captioner_run(tmp_path, "gone", *args) as gone:
        gone.wait_for(lambda: "images listed" in gone.output(), 120, "the listing")
        stoppable_s3.kill()
        code, output = finish(gone)
    assert code == exit_codes.STORAGE_FAILED, output[-3000:]
    assert_one_line_error(output, "cannot commit rows to", bucket.endpoint, "rerun")

    stoppable_s3.start()
    bucket = stoppable_s3.bucket(bucket.name)
    with captioner_run(tmp_path, "rerun", *args) as rerun:
        code, output = finish(rerun)
    assert code == exit_codes.OK, output[-3000:]
    fs = bucket.filesystem()
    parts = [key for key in bucket.keys("out/") if key.startswith("out/part-")]
    uris = sorted(u for key in parts for u in pq.read_table(f"{bucket.name}/{key}", filesystem=fs)["uri"].to_pylist())
    assert uris == sorted(str(p) for p in photos)
    assert_untouched(before, tmp_path / "photos")
