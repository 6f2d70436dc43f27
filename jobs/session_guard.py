"""A watchdog that takes an embedded Ray down with the run, however the run ends.

Ray ties its head processes (GCS, raylet, log monitor) to the driver with
``PR_SET_PDEATHSIG``, but not the rest: after a ``kill -9`` of the driver its
dashboard and runtime-env agents block for 60 s (a timeout fixed in Ray's
code) reporting the raylet's death to the dead GCS, and a worker the raylet
was starting retries the dead GCS for about 20 s; workers sit in process
groups of their own, so a ``kill -9 -PGID`` of the run misses them too.

:class:`SessionGuard` marks every process of the embedded Ray with a token in
its environment (Ray's processes inherit the driver's) and starts this file
as a small process in a session of its own, out of reach of whatever kills
the run's process group. It waits for the driver to end (EOF on its stdin,
which only the driver holds, or a new parent), then SIGKILLs every process
carrying the token until none is left, and exits. After a normal
``ray.shutdown`` that sweep finds nothing, or what the shutdown left.

It never looks at a process without the token, so a cluster joined with
``--address``, another run's Ray or a developer's own are never touched; it is
started only for an embedded Ray. This file is run by path with ``python -I -S``:
standard library only, nothing of the driver's to import, started in
milliseconds without the driver waiting for it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid

log = logging.getLogger(__name__)

SESSION_ENV = "CAPTIONER_RAY_SESSION"
# A sweep ends after this many rounds in a row find nothing (a process the
# raylet was forking as it died shows up a round later), or at the deadline.
_QUIET_ROUNDS = 3
_ROUND_S = 0.1
SWEEP_DEADLINE_S = 8.0


class SessionGuard:
    """Tag the embedded Ray about to start, and guard it: ``start()`` before ``ray.init``, ``stop()`` after ``ray.shutdown``."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._process: subprocess.Popen | None = None
        self._saved_env: str | None = None

    def start(self) -> "SessionGuard":
        self._saved_env = os.environ.get(SESSION_ENV)
        os.environ[SESSION_ENV] = self.token
        if not os.path.isdir("/proc"):
            return self  # it finds processes through /proc (Linux); elsewhere Ray's own fate-sharing is all there is
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), self.token],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:  # a run without its watchdog still runs; only a kill -9 may leave Ray behind
            log.warning("captioner: could not start the watchdog of the embedded Ray (%s)", exc)
        return self

    def stop(self) -> None:
        """The session is over: processes started from here on are not Ray's; the guard sweeps once and exits."""
        if self._saved_env is None:
            os.environ.pop(SESSION_ENV, None)
        else:
            os.environ[SESSION_ENV] = self._saved_env
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()


# ---- the guard process ------------------------------------------------------------


def _wait_for_driver(driver_pid: int, token: str) -> dict[int, int]:
    """Wait for the driver to end; meanwhile keep a pidfd of each process of the session, and of their children.

    What the sweep finds by token is the main net; this is the second one. A
    child of the raylet (its agents) is reparented when the raylet dies, and a
    pidfd taken while it was still the session's child reaches it whatever its
    environment reads by then.
    """
    needle = f"{SESSION_ENV}={token}".encode()
    known: dict[int, int] = {}
    stdin = sys.stdin.fileno()
    while os.getppid() == driver_pid:
        _remember(known, needle, spare={os.getpid(), driver_pid})
        readable, _, _ = select.select([stdin], [], [], 0.5)
        if readable and not os.read(stdin, 4096):
            break  # EOF: the driver closed it (stop) or died
    return known


def _remember(known: dict[int, int], needle: bytes, spare: set[int]) -> None:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(b")", 1)[-1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours = {pid for pid in parents if pid not in spare and _carries(str(pid), needle)}
    ours |= {pid for pid, parent in parents.items() if parent in ours and pid not in spare}
    for pid in ours - set(known):
        try:
            known[pid] = os.pidfd_open(pid)
        except (OSError, AttributeError):
            continue


def _kill_remembered(known: dict[int, int]) -> None:
    for handle in known.values():
        try:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        except OSError:
            pass  # exited already
        finally:
            os.close(handle)


def _wait_for_driver_plain(driver_pid: int) -> None:
    stdin = sys.stdin.fileno()
    while os.getppid() == driver_pid:
        readable, _, _ = select.select([stdin], [], [], 0.5)
        if readable and not os.read(stdin, 4096):
            return


def _carries(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            if stat.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False  # exited; only its parent's wait is missing
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return needle in environ.read().split(b"\0")
    except (OSError, IndexError):
        return False


def _kill(pid: int, needle: bytes) -> bool:
    """SIGKILL ``pid`` if it carries the token; a pidfd, where there is one, makes sure it is the process checked."""
    try:
        handle = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except OSError:
        return False
    try:
        if not _carries(str(pid), needle):
            return False
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        if handle is not None:
            os.close(handle)


def sweep(token: str, spare: set[int], deadline_s: float = SWEEP_DEADLINE_S) -> None:
    needle = f"{SESSION_ENV}={token}".encode()
    deadline = time.monotonic() + deadline_s
    quiet = 0
    while quiet < _QUIET_ROUNDS and time.monotonic() < deadline:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) not in spare]
        killed = sum(_kill(pid, needle) for pid in pids)
        quiet = 0 if killed else quiet + 1
        time.sleep(_ROUND_S)


def main(argv: list[str]) -> int:
    driver_pid, token = int(argv[1]), argv[2]
    for name in ("SIGINT", "SIGHUP", "SIGPIPE"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    known = _wait_for_driver(driver_pid, token) if hasattr(os, "pidfd_open") else (_wait_for_driver_plain(driver_pid) or {})
    # The driver itself carries the token: spared while it lives (a normal stop).
    if known:
        _kill_remembered({pid: fd for pid, fd in known.items() if pid != driver_pid})
    sweep(token, spare={os.getpid(), driver_pid})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
