"""The fault suite's kill scenarios: a real ``captioner run`` killed at chosen moments, then rerun.

Each scenario ends with the five verdicts of tests/fixtures/faults.py: the
source folder untouched, every image exactly once after the rerun, a one-line
message where the process could still speak, a truthful exit code (a
SIGKILL reads -9, a finished rerun 0) and no process of the run, Ray's
included, left 10 s after the kill. A SIGKILL of the process group mid-run
is tests/test_crash_resume.py's driver test, held to the same 10 s.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.interrupt import exit_code_of
from pipeline.storage import is_temp_name
from tests.fixtures.faults import (
    Captioner,
    assert_each_image_once,
    assert_no_process_left,
    assert_untouched,
    describe,
    snapshot,
    tagged_pids,
)
from tests.fixtures.images import make_jpegs

pytestmark = pytest.mark.subprocess


class Collection:
    """A folder of images, a single-file output beside it, and the run command over them."""

    def __init__(self, root: Path, images: int, rows_per_part: int, clip_dir: Path):
        self.root = root
        self.src = root / "photos"
        self.images = make_jpegs(self.src, images)
        self.before = snapshot(self.src)
        self.out = root / "captions.parquet"
        self.parts = root / "captions.parquet.parts"
        self.config = root / "run.yaml"
        self.config.write_text(f"rows_per_part: {rows_per_part}\n")
        self.clip_dir = clip_dir
        self.runs = 0

    def start(self, *flags) -> Captioner:
        self.runs += 1
        return Captioner(
            "run", self.src, "--out", self.out, "--config", self.config,
            "--no-caption", "--no-probes", "--embed-model", self.clip_dir, "--no-progress", *flags,
            log=self.root / f"run-{self.runs}.log",
        )

    def committed_parts(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def rerun_finishes_the_collection(self) -> None:
        """The same command again: exit 0, nothing left behind, every image once, the source untouched."""
        with self.start() as rerun:
            assert rerun.wait(240) == 0, rerun.output()[-3000:]
            assert_no_process_left(rerun.tag, within_s=10)
        assert_each_image_once(self.out, self.images)
        assert_untouched(self.before, self.src)


def _ray_process_up(run: Captioner, names: tuple[str, ...]):
    return lambda: any(name in line for line in describe(tagged_pids(run.tag)) for name in names)


# What a process's command line reads at each moment. A worker renames itself
# "ray::IDLE" (then "ray::<task>") a moment after it starts, so its script name is
# seen only briefly: polling for that alone missed it on a fast CI machine.
RAY_START_MOMENTS = {
    "gcs_server": ("gcs_server",),
    "a_worker": ("default_worker.py", "ray::"),
}


def _killed(run: Captioner) -> None:
    """SIGKILL the run's process group, and check the exit code says so."""
    run.kill()
    assert run.proc.returncode == -signal.SIGKILL


# The GCS is Ray's first process; a worker still starting up sits in a process
# group of its own and, before jobs/session_guard.py, outlived the kill by ~25 s.
def test_kill_during_ray_start(tmp_path, tiny_clip_dir):
    """Killed at each moment of Ray's start in turn, over one collection: each kill leaves no process
    and no row written; the next moment's run, then one rerun, starts from what that kill left, and
    the rerun finishes the collection. (One collection for all moments: a rerun after each paid a
    whole run for the same verdicts.)"""
    collection = Collection(tmp_path, images=12, rows_per_part=4, clip_dir=tiny_clip_dir)
    for moment in sorted(RAY_START_MOMENTS):
        with collection.start() as run:
            run.wait_for(_ray_process_up(run, RAY_START_MOMENTS[moment]), 120, f"{moment} to start")
            _killed(run)
            assert_no_process_left(run.tag, within_s=10)
        assert not collection.out.exists() and not collection.committed_parts(), f"killed at {moment}"
    collection.rerun_finishes_the_collection()


def _merge_temp_file(collection: Collection):
    return lambda: any(is_temp_name(p.name) and p.name.startswith(f".{collection.out.name}") for p in collection.root.iterdir())


def test_kill_during_the_final_merge(tmp_path, tiny_clip_dir):
    # One row a part: the merge reads and writes dozens of files, long enough to be caught at it.
    collection = Collection(tmp_path, images=60, rows_per_part=1, clip_dir=tiny_clip_dir)
    with collection.start() as run:
        run.wait_for(_merge_temp_file(collection), 240, "the merge to start writing the output")
        _killed(run)
        assert_no_process_left(run.tag, within_s=10)
    assert not collection.out.exists(), "the merge published its file before the kill; the test proves nothing"
    assert len(collection.committed_parts()) == 60, "a killed merge must keep every committed part"
    collection.rerun_finishes_the_collection()


def test_sigterm_stops_the_run_keeping_its_committed_rows_then_a_kill_of_the_driver_alone(tmp_path, paced_clip_dir):
    """A supervisor's stop: the run ends at the next batch, commits what reached it, says so in one line.
    Then ``kill -9 PID`` of the next run's driver mid-run: only the driver dies at once; Ray's head,
    agents and workers must follow it. One rerun after both finishes the collection (a rerun after
    each paid a whole run for the same verdicts)."""
    # The paced model: with the tiny one all 100 rows reached the driver within ~0.1 s of the
    # first, and on CI the stop came after the last (exit 0); here the last 50 take ~2 s. Small batches as well: plenty of
    # work still ahead when the stop comes.
    collection = Collection(tmp_path, images=60, rows_per_part=3, clip_dir=paced_clip_dir)
    with collection.start("--embed-batch-size", 2) as run:
        run.wait_for(lambda: len(collection.committed_parts()) >= 2, 180, "two committed parts")
        run.signal(signal.SIGTERM)
        code = run.wait(60)
        output = run.output()
        assert code == exit_code_of(signal.SIGTERM) == 143, output[-3000:]
        assert_no_process_left(run.tag, within_s=10)
    assert "Traceback (most recent call last)" not in output, output[-4000:]
    stopped = [line for line in output.splitlines() if line.startswith("captioner: stopped")]
    assert len(stopped) == 1, output[-3000:]
    committed = sum(pq.read_metadata(p).num_rows for p in collection.committed_parts())
    assert f"{committed} processed rows were committed to {collection.parts}/" in stopped[0], stopped[0]
    assert "SIGTERM" in stopped[0] and "run the same command again" in stopped[0], stopped[0]
    assert 0 < committed < 60 and not collection.out.exists()

    parts_before = len(collection.committed_parts())
    with collection.start("--embed-batch-size", 2) as run:
        run.wait_for(lambda: len(collection.committed_parts()) >= parts_before + 2, 180, "two more committed parts")
        run.signal(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
        assert_no_process_left(run.tag, within_s=10)
    assert not collection.out.exists(), "the run finished before it was killed; the test proves nothing"
    collection.rerun_finishes_the_collection()
