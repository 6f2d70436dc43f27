"""Crash safety: a killed driver or model worker loses no image and duplicates none;
a model failure on one image costs that image's row only.

The driver test kills a real ``captioner run`` subprocess (its own embedded
Ray) with SIGKILL; the other pipeline tests run in-process on a module Ray
that also knows the fault-injection backends of tests/fault_doubles.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.sources import list_images
from pipeline.stages import call_with_bisection
from tests.fixtures.ray import own_ray
from schemas import STATUS_ERROR, STATUS_OK
from tests import fault_doubles
from tests.fixtures.images import make_jpegs
from tests.cli import run_cli
from tests.fixtures.faults import Captioner, assert_no_process_left

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fault_ray(tmp_path_factory, starts_ray):
    """A module Ray whose workers register the fault-injection backends; yields their fault folder."""
    import ray

    fault_dir = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        # The driver resolves model specs too; its registry gets the doubles for this module only.
        fault_doubles.register_in_this_process(patch)
        with own_ray(
            runtime_env={
                "worker_process_setup_hook": "tests.fault_doubles.register",
                # The hook runs before a worker learns the driver's sys.path: put the repo on it.
                "env_vars": {fault_doubles.FAULT_DIR_ENV: str(fault_dir), "PYTHONPATH": _pythonpath()},
            },
        ):
            yield fault_dir


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def listed_uris(folder: Path) -> list[str]:
    return [item.uri for item in list_images(str(folder), extensions=IMAGE_EXTENSIONS)]


# ---- split and retry --------------------------------------------------------------


def test_bisection_isolates_the_failing_item_in_few_calls():
    calls = []

    def model(items):
        calls.append(list(items))
        if 13 in items:
            raise ValueError("cannot handle 13")
        return [item * 10 for item in items]

    results = call_with_bisection(model, list(range(16)))

    assert [r for i, r in enumerate(results) if i != 13] == [i * 10 for i in range(16) if i != 13]
    assert isinstance(results[13], ValueError) and "13" in str(results[13])
    # The whole batch, then one failing and one passing half per level: 1 + 2 * log2(16).
    assert len(calls) == 9


def test_bisection_edge_cases():
    assert call_with_bisection(lambda items: 1 / 0, []) == []
    every = call_with_bisection(lambda items: 1 / 0, [1, 2, 3])
    assert len(every) == 3 and all(isinstance(r, ZeroDivisionError) for r in every)
    # A model that silently drops results is a bug to surface, not a row error.
    with pytest.raises(RuntimeError, match="2 results for 3 inputs"):
        call_with_bisection(lambda items: items[:2], [1, 2, 3])


def test_a_poisoned_image_fails_alone_and_its_batch_mates_succeed(fault_ray, tmp_path, tiny_vlm_dir):
    src = tmp_path / "photos"
    make_jpegs(src, 7)
    make_jpegs(src / "odd", 1, size=fault_doubles.POISON_SIZE, seed=3)
    out = tmp_path / "captions.parquet"

    result = run_cli(src, "--out", out, "--caption-model", f"poisoned:{tiny_vlm_dir}", "--no-embed", "--batch-size", 8)

    rows = {r["uri"]: r for r in rows_of(out)}
    assert sorted(rows) == listed_uris(src)
    poisoned = rows.pop(str(src / "odd" / "img_000000.jpg"))
    assert poisoned["status"] == STATUS_ERROR and poisoned["error_kind"] == "model"
    assert "injected fault" in poisoned["error"] and poisoned["caption"] is None
    # The eight images came as one batch, which was halved until the poisoned image stood alone ...
    assert (fault_ray / "poisoned_batches").read_text().split() == ["8", "4", "2", "1"]
    # ... and the seven others were captioned all the same.
    assert all(r["status"] == STATUS_OK and r["caption"] for r in rows.values())
    assert "errors      1 (model: 1)" in result.output


# ---- a model worker dies ------------------------------------------------------------


def _kill_victim(fault_dir: Path, killed: list[int]) -> None:
    """Wait for KillableEmbedder to report its pid mid-batch, then SIGKILL that process."""
    pid_file = fault_dir / "victim.pid"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = pid_file.read_text() if pid_file.exists() else ""
        if text.strip():
            (fault_dir / "killed").touch()  # first, so the retried batch goes through
            os.kill(int(text), signal.SIGKILL)
            killed.append(int(text))
            return
        time.sleep(0.05)


def test_a_killed_model_worker_is_restarted_and_its_batch_retried(fault_ray, tmp_path, tiny_clip_dir):
    src = tmp_path / "photos"
    make_jpegs(src, 23)
    make_jpegs(src / "victim", 1, size=fault_doubles.VICTIM_SIZE, seed=5)
    out = tmp_path / "captions.parquet"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_victim, args=(fault_ray, killed), daemon=True)
    killer.start()

    run_cli(src, "--out", out, "--no-caption", "--no-probes", "--embed-model", f"killable:{tiny_clip_dir}", "--embed-batch-size", 4)
    killer.join(timeout=5)

    assert killed, "the embed worker never reached the victim batch"
    assert not psutil.pid_exists(killed[0]) or not _running(psutil.Process(killed[0]))
    rows = rows_of(out)
    assert sorted(r["uri"] for r in rows) == listed_uris(src)
    assert all(r["status"] == STATUS_OK and r["embedding"] is not None for r in rows)


# ---- the driver is killed -------------------------------------------------------------


def _running(process: psutil.Process) -> bool:
    # A zombie has exited; only its parent's (or init's) wait is missing.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.subprocess
def test_killed_driver_then_rerun_gives_every_image_exactly_once(fault_ray, tmp_path, tiny_clip_dir):
    src = tmp_path / "photos"
    images = make_jpegs(src, 200)
    out = tmp_path / "captions.parquet"
    parts = tmp_path / "captions.parquet.parts"
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 10\n")
    command = ["run", src, "--out", out, "--config", config, "--no-caption", "--no-probes", "--embed-model", tiny_clip_dir]

    with Captioner(*command, "--no-progress", log=tmp_path / "run.log") as run:
        run.wait_for(lambda: any(parts.glob("part-*.parquet")), 180, "the first part file")
        run.kill()  # SIGKILL to the whole process group
        assert run.proc.returncode == -signal.SIGKILL
        # Ray's workers are in process groups of their own; they must still go with the run (jobs/session_guard.py).
        assert_no_process_left(run.tag, within_s=10)

    assert not out.exists(), "the run finished before it was killed; the test proves nothing"
    committed = [pq.read_table(p).num_rows for p in parts.glob("part-*.parquet")]
    assert committed and set(committed) == {10}  # whole parts, never half of one
    done = sum(committed)
    # What a writer killed mid-write leaves: a dot-named temp file, which readers must skip.
    (parts / ".part-killed-mid-write.parquet.tmp").write_bytes(b"PAR1 half a file")

    result = run_cli(src, "--out", out, "--config", config, "--no-caption", "--no-probes", "--embed-model", tiny_clip_dir)
    assert f"200 images listed, {done} already done, {200 - done} to process" in result.output

    rows = rows_of(out)
    assert sorted(r["uri"] for r in rows) == listed_uris(src) == sorted(str(p) for p in images)
    assert sorted(r["image_id"] for r in rows) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in images)
    assert all(r["status"] == STATUS_OK for r in rows)
    assert not list(parts.glob("part-*.parquet")), "committed parts were not merged away"
    # The merge removes what the killed writer left, and the parts folder with it.
    assert not parts.exists(), list(parts.iterdir())
    again = run_cli(src, "--out", out, "--config", config, "--no-caption", "--no-probes", "--embed-model", tiny_clip_dir)
    assert "200 already done, 0 to process" in again.output
