"""The fault suite, disk: a disk that fills at chosen moments (a run's parts, its final merge, an index build).

Every scenario runs real ``captioner`` processes (tests/fixtures/faults.py)
and ends with the suite's five verdicts: no file of the user's touched,
every image exactly once after the rerun, a one-line message, an exit code
that tells the truth (pipeline.exit_codes), no process left after 10 s.

A full disk is a real, small tmpfs (tests/fixtures/faults.py ``small_disk``).
A file of its own (not tests/test_fault_storage.py's store scenarios) so that
the two halves of the storage faults can run on the two pytest workers at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import exit_codes
from tests.fixtures.faults import (
    EMBED_ONLY,
    Captioner,
    assert_each_image_once,
    assert_one_line_error,
    assert_untouched,
    captioner_run,
    fill_disk,
    finish,
    small_disk,
    snapshot,
    write_committed_output,
)
from tests.fixtures.images import make_jpegs

pytestmark = pytest.mark.subprocess


def _local_photos(tmp_path: Path, n: int) -> list[Path]:
    return make_jpegs(tmp_path / "photos", n)


def test_a_full_disk_mid_run_keeps_committed_parts(tmp_path, tiny_clip_dir):
    photos = _local_photos(tmp_path, 12)
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 2\n")
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        args = [tmp_path / "photos", "--out", f"{out}/", "--config", config, "--embed-model", tiny_clip_dir, *EMBED_ONLY]
        # Room for the saved config, the lease file and a few parts of two rows, not for all six.
        filler = fill_disk(disk, leave_bytes=28_000)
        before_photos = snapshot(tmp_path / "photos")
        with captioner_run(tmp_path, "full", *args) as full:
            code, output = finish(full)
        assert code == exit_codes.STORAGE_FAILED, output[-3000:]
        assert_one_line_error(output, "No space left on device", "free space on", "rerun", "kept")
        assert not [p for p in out.rglob(".*")], "a half-written temporary was left"
        filler.unlink()
        with captioner_run(tmp_path, "rerun", *args) as rerun:
            code, output = finish(rerun)
        assert code == exit_codes.OK, output[-3000:]
        assert_each_image_once(out, photos)
        assert_untouched(before_photos, tmp_path / "photos")


def test_a_full_disk_during_the_final_merge_leaves_the_old_file_and_the_parts(tmp_path, tiny_clip_dir):
    photos = _local_photos(tmp_path, 10)
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "captions.parquet"
        args = [tmp_path / "photos", "--out", out, "--embed-model", tiny_clip_dir, *EMBED_ONLY]
        with captioner_run(tmp_path, "first", *args, "--limit", 2) as first:
            assert finish(first)[0] == exit_codes.OK
        before = snapshot(disk)
        # Room for the new part (about as big as the 2-row file), not for the merged file beside it.
        filler = fill_disk(disk, leave_bytes=out.stat().st_size * 2)
        with captioner_run(tmp_path, "merge", *args) as merge:
            code, output = finish(merge)
        assert code == exit_codes.STORAGE_FAILED, output[-3000:]
        assert_one_line_error(output, "No space left on device", "free space on", "rerun", "kept")
        # The finished file of the first run is as it was; the new rows wait in the parts folder.
        assert_untouched(before, disk, ours=("captions.parquet.parts/", "captions.config.json", filler.name))
        filler.unlink()
        with captioner_run(tmp_path, "rerun", *args) as rerun:
            code, output = finish(rerun)
        assert code == exit_codes.OK, output[-3000:]
        assert_each_image_once(out, photos)
        assert not (disk / "captions.parquet.parts").exists() or not list((disk / "captions.parquet.parts").iterdir())


def test_a_full_disk_during_captioner_index_leaves_the_old_index(tmp_path):
    # The index builds are the real processes here; what they index is committed rows, written directly.
    out = tmp_path / "captions"
    write_committed_output(out, "photo", 6)
    with small_disk(tmp_path / "disk", "16m") as disk:  # room for the old index and a new one beside it
        db = disk / "index.duckdb"
        with Captioner("index", out, "--db", db, log=tmp_path / "index1.log") as first:
            code, output = finish(first, 120)
        assert code == exit_codes.OK, output[-3000:]
        before = snapshot(disk)
        filler = fill_disk(disk, leave_bytes=64_000)
        with Captioner("index", out, "--db", db, "--fresh", log=tmp_path / "index2.log") as full:
            code, output = finish(full, 120)
        assert code == exit_codes.STORAGE_FAILED, output[-3000:]
        assert_one_line_error(output, "No space left on device", "free space on", "untouched")
        assert_untouched(before, disk, ours=(filler.name,))
        filler.unlink()
        with Captioner("index", out, "--db", db, "--fresh", log=tmp_path / "index3.log") as again:
            code, output = finish(again, 120)
        assert code == exit_codes.OK, output[-3000:]
