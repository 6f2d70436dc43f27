"""jobs/session_guard.py: the processes of an embedded Ray go with the run; nobody else's ever do.

Real processes stand in for Ray's (``sleep``, tagged through the environment
like Ray's are); tests/test_fault_kill.py kills real runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jobs import ray_plan
from jobs.session_guard import SESSION_ENV, SessionGuard
from pipeline.config import RunConfig


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_a_joined_cluster_is_neither_tagged_nor_guarded(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append((kwargs["address"], os.environ.get(SESSION_ENV))))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_plan, "_check_reachable", lambda address: None)
    monkeypatch.setattr(SessionGuard, "start", lambda self: pytest.fail("a cluster's processes must never be guarded"))
    config = RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "ray": {"address": "10.0.0.1:6379"}})

    with ray_plan.ray_session(config):
        pass

    assert calls == [("10.0.0.1:6379", None)]


@pytest.mark.subprocess
def test_the_guard_kills_its_sessions_processes_and_nobody_elses_when_the_session_ends():
    guard = SessionGuard().start()
    try:
        ours = subprocess.Popen(["sleep", "60"])  # inherits the token, as Ray's processes do
        theirs = subprocess.Popen(["sleep", "60"], env={k: v for k, v in os.environ.items() if k != SESSION_ENV})
    finally:
        guard.stop()
    try:
        assert SESSION_ENV not in os.environ
        assert ours.wait(timeout=5) == -signal.SIGKILL
        assert theirs.poll() is None, "a process without the session's token was killed"
        assert guard._process.wait(timeout=5) == 0  # and the guard is gone too
        assert _alive(os.getpid())  # the driver carries the token too: spared
    finally:
        theirs.kill()
        theirs.wait()


_DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from jobs.session_guard import SessionGuard
    guard = SessionGuard().start()
    worker = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group of its own, like Ray's workers
    print(worker.pid, guard._process.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.subprocess
def test_a_sigkilled_driver_takes_its_sessions_processes_with_it():
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    worker_pid, guard_pid = map(int, driver.stdout.readline().split())
    try:
        driver.kill()
        driver.wait()
        assert _gone_within(worker_pid, 3), "the session's worker outlived its driver"
        assert _gone_within(guard_pid, 3), "the guard outlived its sweep"
    finally:
        for pid in (worker_pid, guard_pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
