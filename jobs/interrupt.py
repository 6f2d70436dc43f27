"""Ctrl-C (or a supervisor's SIGTERM) during a run: noticed at any moment, acted on only where it is safe.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the
main thread happens to be. During a run that may be inside ``ray.init``'s
native start-up (a segfault, and Ray's agents left running with nobody to
stop them), inside a part-file commit (rows written twice, or counted
wrongly), inside Ray Data's iterator where it can be caught and lost, or in
``ray.shutdown``. :class:`CtrlC` replaces the handler for the run: a SIGINT
only sets a flag, except while the driver waits for the next batch
(:meth:`CtrlC.interruptible`), where it raises at once. :meth:`CtrlC.check`
raises for a flag set anywhere else, and the row loop calls it between
batches, so a swallowed interrupt still stops the run at the next batch.

SIGTERM (``kill PID``, a supervisor's stop) is handled the same way, so a
stopped run also commits the rows that reached it and says what it kept.
The exit code tells which it was (:func:`exit_code_of`): 130 for Ctrl-C, 143
for SIGTERM, as a shell reports a process those signals ended.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from pipeline import exit_codes

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_of(signum: int) -> int:
    """The exit code of a run stopped by ``signum`` (130 Ctrl-C, 143 SIGTERM), as pipeline/exit_codes.py decides."""
    return exit_codes.stopped_by(signum)


class StopRequested(KeyboardInterrupt):
    """A stop signal acted on; ``signum`` says which (SIGINT for Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signal.Signals(signum)


class CtrlC:
    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._interruptible = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "CtrlC":
        # Signal handlers can only be set from the main thread; elsewhere
        # (a library caller's worker thread) Python's own handling stays.
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> bool:
        for signum, previous in self._previous.items():
            if previous is None:  # set outside Python: fall back to Python's own
                previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous)
        self._previous = {}
        return False

    def reclaim(self) -> None:
        """Take the stop signals back after ``ray.init``, which sets its own SIGTERM handlers.

        Ray's Python one exits at once, wherever the main thread is; the
        core worker's native one prints a stack and aborts (exit -6). Either
        loses the rows on their way to the writer and the one-line message.
        """
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self.signum = True, signal.Signals(signum)
        if self._interruptible:
            raise StopRequested(self.signum)

    def check(self) -> None:
        """Raise :class:`StopRequested` (a ``KeyboardInterrupt``) if a stop signal came since the run started."""
        if self.requested:
            raise StopRequested(self.signum)

    @contextlib.contextmanager
    def interruptible(self):
        """A block that a Ctrl-C may cut short at any point (a wait with nothing half done)."""
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

