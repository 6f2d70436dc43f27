"""One model, many Ray batches: the caption actor's feeding loop.

Ray Data runs several calls of one caption actor at once (threads, one Ray
batch each; jobs/ray_plan.py decides how many). Each call hands its images
here and waits; one thread owns the model and runs what is queued as one
model call, so the engine sees one big call instead of many small ones, and
each caller gets back its own results, in its own order.

A call takes whole batches, and no more than ``images_per_call`` images:
with twice that in flight, one call runs while the next one queues, and the
calls stay full. (Taking everything queued would alternate one big call with
a tiny one: while a call runs, only the batches it does not hold can queue.)
A failing call is split by :func:`call_with_bisection`, so a fault costs only
the rows that cause it, and the loop itself never stops.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Job:
    fn: Callable[[list], list]
    items: list
    result: Future = field(default_factory=Future)


class ModelFeeder:
    def __init__(self, images_per_call: int, run: Callable[[Callable[[list], list], list], list]):
        """``run(fn, items)`` is what one merged call does (call_with_bisection with the stage's hooks)."""
        self.images_per_call = max(1, images_per_call)
        self._run = run
        self._queue: deque[_Job] = deque()
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name="model-feeder", daemon=True).start()

    def __call__(self, fn: Callable[[list], list], items: list) -> list:
        """``fn``'s results for ``items`` (an Exception where one item failed), run with other callers' items."""
        if not items:
            return []
        job = _Job(fn, list(items))
        with self._wake:
            self._queue.append(job)
            self._wake.notify()
        return job.result.result()

    def _take(self) -> list[_Job]:
        """The oldest job and the queued ones of the same kind that fit beside it."""
        with self._wake:
            while not self._queue:
                self._wake.wait()
            first = self._queue.popleft()
            taken, kept, count = [first], deque(), len(first.items)
            while self._queue:
                job = self._queue.popleft()
                # Same kind of input (prepared crops or PIL images): one fn, one call.
                if job.fn == first.fn and count + len(job.items) <= self.images_per_call:
                    taken.append(job)
                    count += len(job.items)
                else:
                    kept.append(job)
            self._queue = kept
            return taken

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            try:
                results = self._run(jobs[0].fn, [item for job in jobs for item in job.items])
            except BaseException as exc:  # noqa: BLE001 - an infrastructure fault fails its callers, not the loop
                for job in jobs:
                    job.result.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            start = 0
            for job in jobs:
                job.result.set_result(results[start : start + len(job.items)])
                start += len(job.items)
