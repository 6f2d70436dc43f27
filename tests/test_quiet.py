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
import time

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


@pytest.mark.subprocess
def test_ctrl_c_keeps_committed_rows_and_says_how_to_resume(tmp_path, tiny_vlm_dir, tiny_clip_dir):
    make_jpegs(tmp_path / "photos", 150)
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 2\n")
    out = tmp_path / "out"
    command = [CAPTIONER, "run", str(tmp_path / "photos"), "--out", f"{out}/", "--config", str(config),
               "--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir), "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.parquet")):
            assert process.poll() is None and time.monotonic() < deadline, "no part committed"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted:" in stderr and "are kept" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    kept = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    assert 0 < kept < 150
