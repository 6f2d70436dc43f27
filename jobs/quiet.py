"""Keep Ray's native log lines off the user's terminal during a healthy run.

Ray's C++ core worker writes straight to file descriptor 2, past Python's
logging: every run with an actor pool prints an error-level line about
"constructor arguments in the object store" (Ray Data always passes its map
function that way), and Ray's info/warning lines come the same way. While
:func:`native_stderr_filter` is active, fd 2 goes through a pipe; a thread
forwards everything to the real stderr except Ray's native info/warning lines
and the known-harmless error line. Python's own writes (the progress bar, the
summary) are not touched. ``CAPTIONER_DEBUG=1`` turns the filter off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# "[2026-11-25 15:39:57,828 E 18408 18408] core_worker.cc:2465: ..."
_RAY_NATIVE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([DIWEF]) \d+ \d+\] [\w./-]+:\d+: ")
_HARMLESS_ERRORS = (b"constructor arguments in the object store",)


def _keep(line: bytes) -> bool:
    match = _RAY_NATIVE.match(line)
    if not match:
        return True
    level = match.group(1)
    if level in (b"D", b"I", b"W"):
        return False
    return not any(text in line for text in _HARMLESS_ERRORS)


def _forward(read_fd: int, write_fd: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if _keep(line + b"\n"))
        # A tail with no newline yet (a progress bar's "\r..." frame) goes out
        # at once, unless it may be the start of a Ray line.
        if pending and not pending.startswith(b"["):
            out, pending = out + pending, b""
        if out:
            os.write(write_fd, out)
    if pending and _keep(pending):
        os.write(write_fd, pending)
    os.close(read_fd)


@contextlib.contextmanager
def native_stderr_filter():
    if os.environ.get("CAPTIONER_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # A daemon: a process that inherited the pipe may outlive this block, and
    # the thread must keep draining it so that process never blocks on a full pipe.
    thread = threading.Thread(target=_forward, args=(read_fd, os.dup(saved)), daemon=True, name="ray-stderr-filter")
    thread.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except ValueError:
            pass
        os.dup2(saved, 2)  # closes the pipe's write end held by fd 2
        os.close(saved)
        thread.join(timeout=1.0)
