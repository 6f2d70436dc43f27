"""What a user sees: a clean run prints the bar and the summary, nothing else; Ctrl-C says what is kept.

These run ``captioner`` as a user does, in a subprocess with its own embedded
Ray, because the noise in question is written by Ray's native code straight
to file descriptor 2, which an in-process runner would not see.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest

from tests.fixtures.images import make_jpegs

CAPTIONER = os.path.join(os.path.dirname(sys.executable), "captioner")
_BAR_FRAME = re.compile(r"^[\w+]+: +\d+%\|")


def _env(**extra):
    env = dict(os.environ, **extra)
    env.pop("CAPTIONER_DEBUG", None)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.subprocess
def test_a_clean_run_prints_the_bar_and_the_summary_only(tmp_path, tiny_vlm_dir, tiny_clip_dir):
    make_jpegs(tmp_path / "photos", 6)
    done = subprocess.run(
        [CAPTIONER, "run", str(tmp_path / "photos"), "--out", str(tmp_path / "c.parquet"),
         "--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir), "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith("output ") and "ok          6" in done.stdout
    frames = [frame.strip() for line in done.stderr.split("\n") for frame in line.split("\r") if frame.strip()]
    assert frames[0] == "captioner: 6 images listed, 0 already done, 6 to process"
    unexpected = [frame for frame in frames[1:] if not _BAR_FRAME.match(frame)]
    assert not unexpected, unexpected
    assert any(frame.startswith("captioning+embedding:") for frame in frames[1:])


@pytest.mark.parametrize(
    "caption, probes, embed, label",
    [(True, ("Q?",), True, "captioning+embedding"), (False, ("Q?",), True, "probing+embedding"),
     (False, (), True, "embedding"), (True, (), False, "captioning")],
)
def test_the_bar_names_what_the_run_does(caption, probes, embed, label):
    """--no-caption runs must not say "captioning" (the clean-run test above sees the bar itself)."""
    from jobs.run import _progress_label
    from pipeline.config import RunConfig

    config = RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "caption": {"enabled": caption, "probes": list(probes)},
                                  "embed": {"enabled": embed}})  # fmt: skip
    assert _progress_label(config) == label


class _Family:
    """Every process a run started, seen while the driver lives (Ray re-parents nothing before then)."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.seen = process, {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        driver = psutil.Process(self.process.pid)
        while self.process.poll() is None:
            try:
                for child in driver.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def names(self) -> set[str]:
        return {_name(p) for p in list(self.seen.values())}

    def left_after(self, timeout_s: float) -> list[str]:
        """Processes of the run still alive ``timeout_s`` after the driver exited; they are killed."""
        self._thread.join(timeout=5)
        deadline = time.monotonic() + timeout_s
        while any(map(_alive, self.seen.values())) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"{p.pid} {_name(p)}" for p in self.seen.values() if _alive(p)]
        for p in self.seen.values():
            if _alive(p):
                p.kill()  # ours, by pid
        return left


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return process.name() if not process.cmdline() else os.path.basename(process.cmdline()[0])
    except psutil.Error:
        return "?"


def _start(tmp_path, tiny_vlm_dir, tiny_clip_dir, images: int):
    make_jpegs(tmp_path / "photos", images)
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 2\n")
    out = tmp_path / "out"
    command = [CAPTIONER, "run", str(tmp_path / "photos"), "--out", f"{out}/", "--config", str(config),
               "--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir), "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               start_new_session=True)  # fmt: skip
    return process, out, _Family(process)


def _ctrl_c_when(process: subprocess.Popen, condition, what: str, timeout_s: float = 240) -> str:
    """Wait (generously: the machine may be loaded) for ``condition``, press Ctrl-C, return stderr."""
    try:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert process.poll() is None, f"the run exited ({process.returncode}) before {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return stderr


def _committed_rows(out) -> int:
    return sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))


@pytest.mark.subprocess
def test_ctrl_c_keeps_committed_rows_and_says_how_to_resume(tmp_path, tiny_vlm_dir, tiny_clip_dir):
    process, out, family = _start(tmp_path, tiny_vlm_dir, tiny_clip_dir, 150)
    stderr = _ctrl_c_when(process, lambda: list(out.glob("part-*.parquet")), "the first part file")
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted:" in stderr and "are kept" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr, stderr[-6000:]
    kept = _committed_rows(out)
    assert 0 < kept < 150
    # The message counts exactly the rows the part files hold.
    assert f"interrupted: {kept} processed rows were committed to {out}/ and are kept" in stderr, stderr[-3000:]
    assert family.left_after(20) == [], "processes of the interrupted run outlived it"


@pytest.mark.subprocess
@pytest.mark.parametrize("moment", ["raylet", "DashboardAgent", "first worker"])
def test_ctrl_c_during_ray_start_up_stops_cleanly_and_says_nothing_was_written(tmp_path, tiny_vlm_dir, tiny_clip_dir, moment):
    """Issue 13: Ctrl-C 4-13 s after start segfaulted (139), left Ray's agents behind and claimed a file."""
    process, out, family = _start(tmp_path, tiny_vlm_dir, tiny_clip_dir, 40)
    wanted = {"raylet": "raylet", "DashboardAgent": "ray::DashboardAgent", "first worker": "ray::IDLE"}[moment]
    stderr = _ctrl_c_when(process, lambda: any(wanted in name for name in family.names()), f"{wanted} to start")
    assert process.returncode == 130, stderr[-3000:]
    assert "Segmentation fault" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    if _committed_rows(out):  # a fast machine may finish a batch first; then the count must be right
        assert f"{_committed_rows(out)} processed rows were committed to {out}/" in stderr, stderr[-3000:]
    else:
        assert "nothing was written" in stderr and "committed to" not in stderr, stderr[-3000:]
    assert family.left_after(20) == [], "processes of the interrupted run outlived it"


def test_ctrl_c_is_a_flag_except_while_waiting():
    from jobs.interrupt import CtrlC

    # What the process had: Python's default_int_handler, or SIG_IGN in a process started in the
    # background by a shell without job control (such a shell makes its & jobs ignore SIGINT).
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)  # lands in a "commit": only noted
        time.sleep(0.05)
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c.interruptible():  # the next wait raises before it starts
                pytest.fail("waited although Ctrl-C was pressed")
    with CtrlC() as ctrl_c:
        with pytest.raises(KeyboardInterrupt), ctrl_c.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # a wait is cut short
    assert signal.getsignal(signal.SIGINT) is before  # put back as it was


def test_the_interrupt_message_names_only_a_location_that_exists():
    from jobs.run import RunInterrupted, parts_location
    from pipeline.config import RunConfig

    single = RunConfig.from_dict({"source": "/p", "output": "/o/c.parquet"})
    assert parts_location(single) == "/o/c.parquet.parts/"
    assert parts_location(RunConfig.from_dict({"source": "/p", "output": "s3://b/out/"})) == "s3://b/out/"
    assert "committed to /o/c.parquet.parts/" in str(RunInterrupted(3, parts_location(single)))
    nothing = str(RunInterrupted(0, parts_location(single)))
    assert "nothing was written" in nothing and "/o/c.parquet" not in nothing


def test_sigterm_is_a_stop_like_ctrl_c_with_its_own_exit_code():
    from jobs.interrupt import CtrlC, StopRequested
    from jobs.run import RunInterrupted

    # What was there before (SIG_DFL, or the handler an earlier in-process ray.init left) comes back.
    before = signal.getsignal(signal.SIGTERM)
    with CtrlC() as ctrl_c:
        os.kill(os.getpid(), signal.SIGTERM)  # a supervisor's stop: only noted, like Ctrl-C
        time.sleep(0.05)
        with pytest.raises(StopRequested) as stopped:
            ctrl_c.check()
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert RunInterrupted(3, "/o/", signal.SIGTERM).exit_code == 143
    assert RunInterrupted(3, "/o/").exit_code == 130
    assert str(RunInterrupted(3, "/o/", signal.SIGTERM)).startswith("stopped by SIGTERM: 3 processed rows were committed to /o/")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_after_the_last_batch_stops_before_the_merge(ray_local, tmp_path, tiny_clip_dir, monkeypatch, signum):
    """A stop landing after the last batch reached the driver (its commit, Ray's shutdown) is acted on
    before the merge. It was dropped: CI's SIGTERM came just as a small run ended, the run merged and
    exited 0, and a supervisor could not tell its stop was ignored."""
    import jobs.run
    from jobs.interrupt import exit_code_of

    make_jpegs(tmp_path / "photos", 6)
    real_process = jobs.run._process

    def process_then_stop(*args, **kwargs):
        schema = real_process(*args, **kwargs)  # every row is in; Ray is still up
        os.kill(os.getpid(), signum)
        return schema

    monkeypatch.setattr(jobs.run, "_process", process_then_stop)
    out = tmp_path / "captions.parquet"
    args = ["run", tmp_path / "photos", "--out", out, "--no-caption", "--no-probes",
            "--embed-model", tiny_clip_dir, "--no-progress"]  # fmt: skip
    from tests.cli import cli

    stopped = cli(*args, exit_code=exit_code_of(signum))
    how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    assert f"captioner: {how}: 6 processed rows were committed to {out}.parts/" in stopped.output, stopped.output
    assert not out.exists() and len(list((tmp_path / "captions.parquet.parts").glob("part-*.parquet"))) >= 1

    monkeypatch.setattr(jobs.run, "_process", real_process)
    rerun = cli(*args)
    assert "0 to process" in rerun.output and pq.read_metadata(out).num_rows == 6, rerun.output
