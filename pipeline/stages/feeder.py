"""One model, many Ray batches: the caption actor's feeding loops.

:class:`StreamFeeder` (a model that streams: Moondream's engine) keeps one engine running across Ray
batches, images joining as rows free up. :class:`ModelFeeder` (any other captioner) merges batches into
calls, as follows.

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
from typing import Callable, Protocol


@dataclass
class _Job:
    fn: Callable[[list], list]
    items: list
    result: Future = field(default_factory=Future)


class _OneThreadFeeder:
    """Callers queue a job and wait on its Future; one daemon thread (the subclass's ``_loop``) owns the model."""

    def _start(self, thread_name: str) -> None:
        self._queue: deque = deque()
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name=thread_name, daemon=True).start()

    def _submit(self, job):
        with self._wake:
            self._queue.append(job)
            self._wake.notify()
        return job.result.result()

    def _loop(self) -> None:
        raise NotImplementedError


class ModelFeeder(_OneThreadFeeder):
    def __init__(self, images_per_call: int, run: Callable[[Callable[[list], list], list], list]):
        """``run(fn, items)`` is what one merged call does (call_with_bisection with the stage's hooks)."""
        self.images_per_call = max(1, images_per_call)
        self._run = run
        self._start("model-feeder")

    def __call__(self, fn: Callable[[list], list], items: list) -> list:
        """``fn``'s results for ``items`` (an Exception where one item failed), run with other callers' items."""
        if not items:
            return []
        return self._submit(_Job(fn, list(items)))

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


class Stream(Protocol):
    """What StreamFeeder drives (the captioner's DescriptionStream): items join a running model one by one."""

    def add(self, key: int, item) -> None: ...  # raises for an item the model cannot take (that item's fault)

    def advance(self) -> list[tuple[int, object]]: ...  # a round of work: (key, result) of items finished


@dataclass(eq=False)
class _StreamJob:
    fn: Callable[[list], list]
    items: list
    results: list = field(default_factory=list)
    left: int = 0
    result: Future = field(default_factory=Future)

    def set(self, index: int, value) -> None:
        self.results[index] = value
        self.left -= 1
        if self.left == 0:
            self.result.set_result(self.results)


class StreamFeeder(_OneThreadFeeder):
    """One running model, many Ray batches, no draining between them: the caption actor's feeding loop
    when its model can stream (Moondream's engine, engine.EngineStream).

    Callers (Ray Data's threads, a batch each) hand their items in and wait. One thread owns the stream:
    queued items join the running engine as its rows free up, and each caller gets its results as soon as
    its own items are done, while later batches' items are still decoding. The engine drains only when
    the input does, not at the end of every batch; each Ray call still returns exactly its own batch.

    A fault of the stream (out of memory, say) ends it: the items it held are run again by ``fallback(fn,
    items)`` (call_with_bisection: halves, then single items, then that item's error), and a fresh stream
    takes the next ones. An item the stream refuses on ``add`` gets that exception as its result.
    """

    def __init__(self, open_stream: Callable[[], Stream], fallback: Callable[[Callable[[list], list], list], list],
                 on_fault: Callable[[Exception], None] | None = None):
        self._open, self._fallback, self._on_fault = open_stream, fallback, on_fault
        self._start("model-stream")

    def __call__(self, fn: Callable[[list], list], items: list) -> list:
        if not items:
            return []
        return self._submit(_StreamJob(fn, list(items), [None] * len(items), len(items)))

    def _loop(self) -> None:
        stream: Stream | None = None
        held: dict[int, tuple[_StreamJob, int]] = {}  # key -> the item in the stream
        next_key = 0
        while True:
            with self._wake:
                while not self._queue and not held:
                    self._wake.wait()
                jobs = list(self._queue)
                self._queue.clear()
            try:
                for job in jobs:
                    for index, item in enumerate(job.items):
                        if stream is None:
                            stream = self._open()
                        held[next_key] = (job, index)  # before add: a fault in add is retried as the stream's
                        try:
                            stream.add(next_key, item)
                        except Exception as exc:  # noqa: BLE001 - this item's fault, a row error
                            del held[next_key]
                            job.set(index, exc)
                        next_key += 1
                if held:
                    for key, result in stream.advance():
                        job, index = held.pop(key)
                        job.set(index, result)
            except BaseException as exc:  # noqa: BLE001 - the stream is broken; its items are retried
                stream, lost = None, list(held.values())
                held.clear()
                # And this round's items not added yet (results are never None once set).
                lost += [(job, index) for job in jobs for index in range(len(job.items))
                         if job.results[index] is None and (job, index) not in lost]
                self._recover(lost, exc)

    def _recover(self, lost: list[tuple[_StreamJob, int]], exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            for job in {id(job): job for job, _ in lost}.values():
                if not job.result.done():
                    job.result.set_exception(exc)
            raise exc
        if self._on_fault is not None:
            self._on_fault(exc)
        by_fn: dict = {}
        for job, index in lost:
            by_fn.setdefault(job.fn, []).append((job, index))
        for fn, members in by_fn.items():
            try:
                results = self._fallback(fn, [job.items[index] for job, index in members])
            except BaseException as fault:  # noqa: BLE001 - an infrastructure fault fails its callers
                for job in {id(job): job for job, _ in members}.values():
                    if not job.result.done():
                        job.result.set_exception(fault)
                if not isinstance(fault, Exception):
                    raise
                continue
            for (job, index), result in zip(members, results):
                job.set(index, result)
