"""Ctrl-C during a run: noticed at any moment, acted on only where it is safe.

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
"""

from __future__ import annotations

import contextlib
import signal
import threading


class CtrlC:
    def __init__(self) -> None:
        self.requested = False
        self._interruptible = 0
        self._previous = None
        self._installed = False

    def __enter__(self) -> "CtrlC":
        # Signal handlers can only be set from the main thread; elsewhere
        # (a library caller's worker thread) Python's own handling stays.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
        return False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._interruptible:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the run started."""
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self):
        """A block that a Ctrl-C may cut short at any point (a wait with nothing half done)."""
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1
