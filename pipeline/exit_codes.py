"""Exit codes of the captioner CLI beyond click's 0 (done), 1 (failed) and 2 (usage).

One place, so that scripts and supervisors can tell "try again later" from "broken".
"""

# Another run or index build holds the lease on this output or --db (pipeline/lease.py):
# nothing was done, nothing is wrong; run again once it has finished. EX_TEMPFAIL of sysexits.h.
BUSY = 75

