"""What each exit status of ``captioner`` means: decided here, used by the CLI, stated in the README.

``captioner run`` exits 0 when the run finished, even if some images became
error rows (bad files are rows, not failures). Every other status says why
it did not finish, so that a script or scheduler can act on it.
"""

from __future__ import annotations

#: Finished. Rows with status=error are images that could not be used, not a failed run.
OK = 0
#: The command failed for a reason to fix first (config, source, output, weights, Ray): the message says which.
FAILED = 1
#: The command line itself is wrong (click's usage errors).
USAGE = 2
#: Storage failed under the run: a store stopped answering or refused connections, or a disk filled up.
#: Committed rows are kept; once the storage is back, rerunning the same command resumes.
STORAGE_FAILED = 3
#: Interrupted (Ctrl-C); committed rows are kept and the same command resumes.
INTERRUPTED = 130

MEANINGS = {
    OK: "finished (images that could not be used are rows with status=error)",
    FAILED: "failed: fix what the message names, then rerun",
    USAGE: "the command line is wrong (see --help)",
    STORAGE_FAILED: "storage failed (stalled, refused or full): committed rows are kept; rerun the same command once it is back",
    INTERRUPTED: "interrupted (Ctrl-C): committed rows are kept; rerun the same command to resume",
}
