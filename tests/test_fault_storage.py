"""The fault suite, storage: a store that stalls, refuses, or a disk that fills, at chosen moments.

Every scenario runs real ``captioner`` processes (tests/fixtures/faults.py)
and ends with the suite's five verdicts: no file of the user's touched,
every image exactly once after the rerun, a one-line message, an exit code
that tells the truth (pipeline.exit_codes), no process left after 10 s.

The store is moto's server in a child process (tests/fixtures/s3.py
``stoppable_s3``), frozen with SIGSTOP (it accepts connections and never
answers) or killed (connection refused). A full disk is a real, small tmpfs
(tests/fixtures/faults.py ``small_disk``). Deadlines are set small through
``--storage-option timeout_s=... attempts=...`` so a stall is seconds, not
the users' default minute.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import exit_codes
from tests.fixtures.faults import (
    Captioner,
    assert_each_image_once,
    assert_no_process_left,
    assert_one_line_error,
    assert_untouched,
    fill_disk,
    small_disk,
    snapshot,
)
from tests.fixtures.images import make_jpegs

pytestmark = pytest.mark.subprocess

# A stalled request fails after 2 attempts x 2 x 1.5 s (connect, answer) + 1 s backoff: 7 s at most.
FAST_DEADLINE = ["--storage-option", "timeout_s=1.5", "--storage-option", "attempts=2"]
MODELS = ["--no-caption", "--no-probes", "--no-progress"]


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


def _run(tmp_path: Path, name: str, *args, **kwargs) -> Captioner:
    return Captioner("run", *map(str, args), log=tmp_path / f"{name}.log", **kwargs)


def _finish(proc: Captioner, timeout_s: float = 240) -> tuple[int, str]:
    code = proc.wait(timeout_s)
    assert_no_process_left(proc.tag)
    return code, proc.output()


# ---- storage stalled -------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["stalled", "refusing"])
def test_a_store_that_stops_answering_mid_run_fails_it_in_bounded_time(moment, stoppable_s3, tmp_path, tiny_clip_dir):
    """Frozen (SIGSTOP) or gone (killed) after the listing, while the workers read: the run ends
    within the stated deadline with one line and exit 3; committed rows stay; the rerun completes."""
    bucket = stoppable_s3.bucket()
    urls = _upload(bucket, tmp_path, 8)
    originals = _bucket_snapshot(bucket)
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("the user's own file\n")
    out = out_dir / "captions.parquet"
    args = [bucket.url("photos"), "--out", out, "--embed-model", tiny_clip_dir, *MODELS, *bucket.cli_options, *FAST_DEADLINE]

    with _run(tmp_path, "first", *args, "--limit", 3) as first:
        assert _finish(first)[0] == exit_codes.OK
    before = snapshot(out_dir)

    with _run(tmp_path, "failing", *[a for a in args if a != "--no-progress"]) as failing:
        failing.wait_for(lambda: "images listed" in failing.output(), 120, "the listing")
        stopped = time.monotonic()
        if moment == "stalled":
            stoppable_s3.freeze()
        else:
            stoppable_s3.kill()
        code, output = _finish(failing)
        waited = time.monotonic() - stopped
    assert code == exit_codes.STORAGE_FAILED, output[-3000:]
    line = assert_one_line_error(output, bucket.endpoint, "rerun")
    assert "rows" in line and "kept" in line, line
    # The deadline is 7 s; the rest is Ray's start, the model's load and the shutdown, up to a minute or
    # more on a loaded machine. Without a deadline the run hung for 541 s before it was killed.
    assert waited < 150, f"the run took {waited:.0f} s to give up"
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
    with _run(tmp_path, "rerun", *args) as rerun:
        code, output = _finish(rerun)
    assert code == exit_codes.OK, output[-3000:]
    assert_each_image_once(out, urls)
    assert _bucket_snapshot(bucket) == originals
    assert_untouched({k: v for k, v in before.items() if k != "captions.parquet"}, out_dir,
                     ours=("captions.parquet", "captions.config.json"))


def test_a_gone_endpoint_at_listing_is_one_line_naming_it(stoppable_s3, tmp_path, tiny_clip_dir):
    bucket = stoppable_s3.bucket()
    _upload(bucket, tmp_path, 2)
    stoppable_s3.kill()
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    before = snapshot(out_dir)
    started = time.monotonic()
    with _run(tmp_path, "refused", bucket.url("photos"), "--out", out_dir / "captions.parquet",
              "--embed-model", tiny_clip_dir, *MODELS, *bucket.cli_options, *FAST_DEADLINE) as refused:
        code, output = _finish(refused, 120)
    assert code == exit_codes.STORAGE_FAILED, output[-3000:]
    assert_one_line_error(output, bucket.endpoint, "did not answer", "rerun")
    assert time.monotonic() - started < 60
    assert_untouched(before, out_dir)


# ---- disk full ---------------------------------------------------------------------------


def _local_photos(tmp_path: Path, n: int) -> list[Path]:
    return make_jpegs(tmp_path / "photos", n)


def test_a_full_disk_mid_run_keeps_committed_parts(tmp_path, tiny_clip_dir):
    photos = _local_photos(tmp_path, 12)
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 2\n")
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        args = [tmp_path / "photos", "--out", f"{out}/", "--config", config, "--embed-model", tiny_clip_dir, *MODELS]
        # Room for the saved config, the lease file and a few parts of two rows, not for all six.
        filler = fill_disk(disk, leave_bytes=28_000)
        before_photos = snapshot(tmp_path / "photos")
        with _run(tmp_path, "full", *args) as full:
            code, output = _finish(full)
        assert code == exit_codes.STORAGE_FAILED, output[-3000:]
        assert_one_line_error(output, "No space left on device", "free space on", "rerun", "kept")
        assert not [p for p in out.rglob(".*")], "a half-written temporary was left"
        filler.unlink()
        with _run(tmp_path, "rerun", *args) as rerun:
            code, output = _finish(rerun)
        assert code == exit_codes.OK, output[-3000:]
        assert_each_image_once(out, photos)
        assert_untouched(before_photos, tmp_path / "photos")


def test_a_full_disk_during_the_final_merge_leaves_the_old_file_and_the_parts(tmp_path, tiny_clip_dir):
    photos = _local_photos(tmp_path, 10)
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "captions.parquet"
        args = [tmp_path / "photos", "--out", out, "--embed-model", tiny_clip_dir, *MODELS]
        with _run(tmp_path, "first", *args, "--limit", 2) as first:
            assert _finish(first)[0] == exit_codes.OK
        before = snapshot(disk)
        # Room for the new part (about as big as the 2-row file), not for the merged file beside it.
        filler = fill_disk(disk, leave_bytes=out.stat().st_size * 2)
        with _run(tmp_path, "merge", *args) as merge:
            code, output = _finish(merge)
        assert code == exit_codes.STORAGE_FAILED, output[-3000:]
        assert_one_line_error(output, "No space left on device", "free space on", "rerun", "kept")
        # The finished file of the first run is as it was; the new rows wait in the parts folder.
        assert_untouched(before, disk, ours=("captions.parquet.parts/", "captions.config.json", filler.name))
        filler.unlink()
        with _run(tmp_path, "rerun", *args) as rerun:
            code, output = _finish(rerun)
        assert code == exit_codes.OK, output[-3000:]
        assert_each_image_once(out, photos)
        assert not (disk / "captions.parquet.parts").exists() or not list((disk / "captions.parquet.parts").iterdir())


def test_a_full_disk_during_captioner_index_leaves_the_old_index(tmp_path, tiny_clip_dir):
    _local_photos(tmp_path, 6)
    out = tmp_path / "captions.parquet"
    with _run(tmp_path, "caption", tmp_path / "photos", "--out", out, "--embed-model", tiny_clip_dir, *MODELS) as run:
        assert _finish(run)[0] == exit_codes.OK
    with small_disk(tmp_path / "disk", "16m") as disk:  # room for the old index and a new one beside it
        db = disk / "index.duckdb"
        with Captioner("index", out, "--db", db, log=tmp_path / "index1.log") as first:
            code, output = _finish(first, 120)
        assert code == exit_codes.OK, output[-3000:]
        before = snapshot(disk)
        filler = fill_disk(disk, leave_bytes=64_000)
        with Captioner("index", out, "--db", db, "--fresh", log=tmp_path / "index2.log") as full:
            code, output = _finish(full, 120)
        assert code == exit_codes.STORAGE_FAILED, output[-3000:]
        assert_one_line_error(output, "No space left on device", "free space on", "untouched")
        assert_untouched(before, disk, ours=(filler.name,))
        filler.unlink()
        with Captioner("index", out, "--db", db, "--fresh", log=tmp_path / "index3.log") as again:
            code, output = _finish(again, 120)
        assert code == exit_codes.OK, output[-3000:]


def test_an_output_bucket_gone_before_the_commit_is_one_line(stoppable_s3, tmp_path, tiny_clip_dir):
    """Local images, parts to a bucket whose endpoint goes away after the listing: the commit
    fails in one line naming the endpoint, exit 3; with the endpoint back the rerun writes each image once."""
    import pyarrow.parquet as pq

    photos = _local_photos(tmp_path, 4)
    before = snapshot(tmp_path / "photos")
    bucket = stoppable_s3.bucket()
    args = [tmp_path / "photos", "--out", bucket.url("out/"), "--embed-model", tiny_clip_dir, *MODELS,
            *bucket.cli_options, *FAST_DEADLINE]
    with _run(tmp_path, "gone", *args) as gone:
        gone.wait_for(lambda: "images listed" in gone.output(), 120, "the listing")
        stoppable_s3.kill()
        code, output = _finish(gone)
    assert code == exit_codes.STORAGE_FAILED, output[-3000:]
    assert_one_line_error(output, "cannot commit rows to", bucket.endpoint, "rerun")

    stoppable_s3.start()
    bucket = stoppable_s3.bucket(bucket.name)
    with _run(tmp_path, "rerun", *args) as rerun:
        code, output = _finish(rerun)
    assert code == exit_codes.OK, output[-3000:]
    fs = bucket.filesystem()
    parts = [key for key in bucket.keys("out/") if key.startswith("out/part-")]
    uris = sorted(u for key in parts for u in pq.read_table(f"{bucket.name}/{key}", filesystem=fs)["uri"].to_pylist())
    assert uris == sorted(str(p) for p in photos)
    assert_untouched(before, tmp_path / "photos")
