"""What a run does when its storage fails: stop, keep what is committed, say so in one line.

A store that stopped answering (or refuses connections) makes every read of
a batch fail with error kind ``storage`` (schemas.errors.STORAGE_ERROR_KINDS);
such a batch ends the run with :class:`RunStorageFailed`, rather than waiting
out the deadline of every other image. A disk or bucket that fails while
parts are committed or merged does the same. Each is a StorageError with
``outage`` set, which the CLI turns into exit status 3
(pipeline.exit_codes.STORAGE_FAILED).

:class:`WaitingNote` puts on the progress bar what the run is waiting for
when no row arrived for a while, and how long storage is waited for.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa

from pipeline.storage import (
    UNAVAILABLE_FIX, StorageError, explain, full_disk_fix, full_disk_reason, is_full_disk, is_unavailable, storage_limits_of,
    unavailable_reason,
)
from schemas import STATUS_OK
from schemas.errors import STORAGE_ERROR_KINDS

#: The bar says what it waits for once no row came for this long (or one storage deadline, if shorter).
WAITING_NOTE_AFTER_S = 10.0


class RunStorageFailed(StorageError):
    """The storage failed under a running job; committed rows are kept (the message says where)."""

    outage = True


def is_storage_failure(table: pa.Table) -> bool:
    """Whether every row of a batch failed because the storage did (not because of its image)."""
    if table.num_rows == 0:
        return False
    statuses = table["status"].to_pylist()
    kinds = table["error_kind"].to_pylist()
    return all(s != STATUS_OK and k in STORAGE_ERROR_KINDS for s, k in zip(statuses, kinds))


def batch_failed(table: pa.Table, source: str, committed: int, where: str, storage_options: dict | None) -> RunStorageFailed:
    first = next(e for e in table["error"].to_pylist() if e)
    return RunStorageFailed(
        f"storage failed: none of a batch of {table.num_rows} images of {source} could be read, "
        f"{unavailable_reason(first, storage_options)}. {_kept(committed, where)}. Fix: {UNAVAILABLE_FIX}: "
        "the rerun resumes and retries the images that were not read"
    )


def _kept(committed: int, where: str) -> str:
    return f"The {committed} rows committed to {where} are kept" if committed else "No row of this run was committed"


def wrap_write_failure(exc: BaseException, *, doing: str, output: str, committed: int, where: str,
                       storage_options: dict | None) -> BaseException:
    """A storage failure while committing or merging rows, as one line; anything else as it was."""
    if not (is_full_disk(exc) or is_unavailable(exc)):
        return exc
    if is_full_disk(exc):
        fix = f"{full_disk_fix(exc, where.rstrip('/'))} and rerun the same command: it resumes from the committed rows"
        return RunStorageFailed(f"cannot {doing} {output}: {full_disk_reason(exc)}. {_kept(committed, where)}. Fix: {fix}")
    error = explain(exc, output, doing=doing, role="output", storage_options=storage_options)
    return RunStorageFailed(f"{error}. {_kept(committed, where)}")


class WaitingNote:
    """A thread that, while no row arrives, says so on the bar once a second; cleared by :meth:`arrived`.

    It sleeps on an Event between looks (no busy loop) and only touches the
    bar's postfix, which tqdm guards with its own lock.
    """

    def __init__(self, bar, storage_options: dict | None, *, remote: bool):
        self.bar = bar
        self.limits = storage_limits_of(storage_options)
        self.remote = remote
        self.after_s = min(WAITING_NOTE_AFTER_S, self.limits.timeout_s) if remote else WAITING_NOTE_AFTER_S
        self.last = time.monotonic()
        self.shown = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="captioner-waiting-note", daemon=True)

    def start(self) -> None:
        if not self.bar.disable:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def arrived(self) -> None:
        self.last = time.monotonic()
        self.shown = False

    def text(self, quiet_s: float) -> str:
        text = f"waiting for rows: none for {quiet_s:.0f} s"
        if self.remote:
            text += f" ({self.limits.describe()})"
        return text

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            quiet = time.monotonic() - self.last
            if quiet >= self.after_s:
                self.shown = True
                self.bar.set_postfix_str(self.text(quiet), refresh=True)
