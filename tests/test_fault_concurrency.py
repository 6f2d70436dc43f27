"""Fault suite, concurrency: two runs into one output, two index builds into one --db, a run beside an index build.

Each scenario ends with the five verdicts of tests/fixtures/faults.py. The
first of two writers holds the lease (pipeline/lease.py); it is paused
(SIGSTOP) while the second arrives, so the overlap is certain, not a matter
of timing, and resumed (SIGCONT) to finish.
"""

from __future__ import annotations

import signal
from pathlib import Path

import duckdb
import pytest

from pipeline.exit_codes import BUSY
from tests.fixtures.faults import (
    write_committed_output,
    Captioner,
    assert_each_image_once,
    assert_no_process_left,
    assert_one_line_error,
    assert_untouched,
    index_files,
    snapshot,
)
from tests.fixtures.images import make_jpegs

pytestmark = pytest.mark.subprocess


def _run_args(src: Path, out: Path, config: Path, clip: Path) -> list:
    return ["run", src, "--out", out, "--config", config, "--no-caption", "--no-probes", "--embed-model", clip, "--no-progress"]


def _config(tmp_path: Path, rows_per_part: int = 5) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"rows_per_part: {rows_per_part}\n")
    return config


def _paused(writer: Captioner):
    """SIGSTOP ``writer`` for the block (it stays alive and keeps its lease), SIGCONT after."""

    class _Pause:
        def __enter__(self):
            writer.signal(signal.SIGSTOP)

        def __exit__(self, *exc):
            writer.signal(signal.SIGCONT)

    return _Pause()


def test_two_runs_into_one_output_the_second_refuses_naming_the_first(tmp_path, tiny_clip_dir):
    src = tmp_path / "photos"
    images = make_jpegs(src, 30)
    before = snapshot(src)
    out = tmp_path / "captions"
    config = _config(tmp_path)
    args = _run_args(src, out, config, tiny_clip_dir)

    with Captioner(*args, log=tmp_path / "first.log") as first:
        first.wait_for(lambda: any(out.glob("part-*.parquet")), 180, "the first run's first part")
        with _paused(first):
            with Captioner(*args, log=tmp_path / "second.log") as second:
                code = second.wait(120)
                said = second.output()
        assert code == BUSY, said
        line = assert_one_line_error(said, "is being written by", f"pid {first.pid}", "captioner run")
        assert "wait for it to finish" in line
        assert first.wait(180) == 0, first.output()[-3000:]
    assert_no_process_left(first.tag)
    assert_no_process_left(second.tag)

    with Captioner(*args, log=tmp_path / "rerun.log") as rerun:
        assert rerun.wait(180) == 0, rerun.output()[-3000:]
        assert "30 already done, 0 to process" in rerun.output()
    assert_no_process_left(rerun.tag)
    assert_each_image_once(out, images)
    assert_untouched(before, src)
    assert not list(out.glob(".*lease*")), "the lease outlived the runs"


def _indexed(db: Path) -> tuple[list[str], list[str]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        uris = [r[0] for r in con.execute("SELECT uri FROM images ORDER BY uri").fetchall()]
    finally:
        con.close()
    from pipeline.search.contract import read_info

    con = duckdb.connect(str(db), read_only=True)
    try:
        sources = list(read_info(con, where=str(db)).sources)
    finally:
        con.close()
    return uris, sources


def test_two_index_builds_into_one_db_the_second_refuses_and_no_source_is_lost(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    uris = write_committed_output(one, "one", 400) + write_committed_output(two, "two", 300)
    before = {name: snapshot(tmp_path / name) for name in ("one", "two")}
    db = tmp_path / "index" / "index.duckdb"
    db.parent.mkdir()

    with Captioner("index", one, "--db", db, log=tmp_path / "first.log") as first:
        # The lease comes before any work; without one, the build's temporary file is the first sign of it.
        first.wait_for(lambda: any(db.parent.glob(".index.duckdb*")), 120, "the first build to start")
        with _paused(first):
            with Captioner("index", two, "--db", db, log=tmp_path / "second.log") as second:
                code = second.wait(120)
                said = second.output()
        assert code == BUSY, said
        assert_one_line_error(said, "is being written by", f"pid {first.pid}", "captioner index")
        assert first.wait(120) == 0, first.output()
    assert_no_process_left(first.tag)
    assert_no_process_left(second.tag)

    with Captioner("index", two, "--db", db, log=tmp_path / "rerun.log") as rerun:
        assert rerun.wait(120) == 0, rerun.output()
    assert_no_process_left(rerun.tag)
    indexed, sources = _indexed(db)
    assert indexed == sorted(uris), f"{len(indexed)} rows for {len(uris)} images"
    assert sorted(sources) == sorted([str(one), str(two)])
    for name, files in before.items():
        assert_untouched(files, tmp_path / name)
    # index format 2: the catalogue and its vector file, nothing else
    assert sorted(p.name for p in db.parent.iterdir()) == index_files(db), "temporaries or the lease outlived the builds"


def test_an_index_beside_a_run_reads_committed_rows_or_says_the_output_changed(tmp_path, tiny_clip_dir):
    src = tmp_path / "photos"
    images = make_jpegs(src, 30)
    before = snapshot(src)
    out = tmp_path / "captions.parquet"
    parts = tmp_path / "captions.parquet.parts"
    db = tmp_path / "index.duckdb"
    args = _run_args(src, out, _config(tmp_path, rows_per_part=2), tiny_clip_dir)

    outcomes = []
    with Captioner(*args, log=tmp_path / "run.log") as run:
        run.wait_for(lambda: any(parts.glob("part-*.parquet")), 180, "the run's first part")
        # Index again and again while the run commits parts and merges them into the file.
        while run.running() or not outcomes:
            with Captioner("index", out, "--db", db, log=tmp_path / f"index-{len(outcomes)}.log") as index:
                code = index.wait(120)
                said = index.output()
            assert_no_process_left(index.tag)
            if code != 0:
                assert_one_line_error(said, "changed while", "rerun")
            outcomes.append(code)
        assert run.wait(180) == 0, run.output()[-3000:]
    assert_no_process_left(run.tag)

    with Captioner("index", out, "--db", db, log=tmp_path / "final.log") as final:
        assert final.wait(120) == 0, final.output()
    assert_no_process_left(final.tag)
    indexed, _ = _indexed(db)
    assert indexed == sorted(str(p) for p in images), f"{len(indexed)} rows for {len(images)} images"
    assert_each_image_once(out, images)
    assert_untouched(before, src)
    assert outcomes, "no index ran beside the run"


def test_a_killed_runs_and_index_builds_temporaries_are_cleaned_by_the_next(tmp_path, tiny_clip_dir):
    src = tmp_path / "photos"  # nothing to process: the cleanup comes with the lease, before any listing
    src.mkdir()
    images = []
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "captions.parquet"
    parts = out_dir / "captions.parquet.parts"
    parts.mkdir()
    # What killed writers leave (pipeline.storage's temporary-name rule, and older spellings).
    left = [
        parts / ".part-20260101T000000-dead-00001.parquet.tmp-999999-abcd1234",
        parts / ".part-old.parquet.tmp",
        out_dir / ".captions.parquet.tmp-999999-abcd1234",
        out_dir / ".captions.config.json.tmp-999999-abcd1234",
    ]
    for path in left:
        path.write_bytes(b"PAR1 half a file")
    # Not ours: a user's own dot-file beside the output, even one that looks like a temporary.
    mine = out_dir / ".notes.txt.tmp"
    mine.write_text("the user's")
    with Captioner(*_run_args(src, out, _config(tmp_path), tiny_clip_dir), log=tmp_path / "run.log") as run:
        assert run.wait(180) == 0, run.output()[-3000:]
    assert_no_process_left(run.tag)
    assert [p for p in left if p.exists()] == []
    assert mine.read_text() == "the user's"
    assert_each_image_once(out, images)

    db = tmp_path / "index.duckdb"
    stale = [tmp_path / ".index.duckdb.tmp-999999-abcd1234", tmp_path / ".index.duckdb.tmp-999999-abcd1234.wal"]
    for path in stale:
        path.write_bytes(b"half an index")
    with Captioner("index", out, "--db", db, log=tmp_path / "index.log") as index:
        assert index.wait(120) == 0, index.output()
    assert_no_process_left(index.tag)
    assert [p for p in stale if p.exists()] == []
    assert _indexed(db)[0] == sorted(str(p) for p in images)
