"""What each exit status of ``captioner`` means: decided here, used by the CLI, stated in the README.

``captioner run`` exits 0 when the run finished, even if some images became
error rows (bad files are rows, not failures). Every other status says why
it did not finish, so that a script or scheduler can act on it: fix and
rerun (1, 2), rerun once the storage is back (3), rerun later (75), or it
was stopped (130, 143).
"""

from __future__ import annotations

import signal

#: Finished. Rows with status=error are images that could not be used, not a failed run.
OK = 0
#: The command failed for a reason to fix first (config, source, output, weights, Ray): the message says which.
FAILED = 1
#: The command line itself is wrong (click's usage errors).
USAGE = 2
#: Storage failed under the run: a store stopped answering or refused connections, or a disk filled up.
#: Committed rows are kept; once the storage is back, rerunning the same command resumes.
STORAGE_FAILED = 3
#: Another run or index build holds the lease on this output or --db (pipeline/lease.py): nothing was
#: done and nothing is wrong; run again once it has finished. EX_TEMPFAIL of sysexits.h.
BUSY = 75


def stopped_by(signum: int) -> int:
    """The exit code of a run stopped by ``signum``: 128 + the signal, as a shell reports it."""
    return 128 + int(signum)


#: Interrupted (Ctrl-C); committed rows are kept and the same command resumes.
INTERRUPTED = stopped_by(signal.SIGINT)
#: Stopped by SIGTERM (``kill PID``, a supervisor's stop); committed rows are kept, as for Ctrl-C.
TERMINATED = stopped_by(signal.SIGTERM)

MEANINGS = {
    OK: "finished (images that could not be used are rows with status=error)",
    FAILED: "failed: fix what the message names, then rerun",
    USAGE: "the command line is wrong (see --help)",
    STORAGE_FAILED: "storage failed (stalled, refused or full): committed rows are kept; rerun the same command once it is back",
    BUSY: "another run or index build holds the lease on this output or --db: nothing was done; rerun once it has finished",
    INTERRUPTED: "interrupted (Ctrl-C): committed rows are kept; rerun the same command to resume",
    TERMINATED: "stopped by SIGTERM: committed rows are kept; rerun the same command to resume",
}
