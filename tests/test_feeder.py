"""The caption actor's streaming loop (pipeline/stages/feeder.py StreamFeeder) with a stand-in stream:
each caller gets exactly its own results in order, an item refused on add is that item's exception, a
broken stream's items go to the fallback and a fresh stream takes the next ones. No model, no Ray."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.stages.feeder import StreamFeeder


class FakeStream:
    """Finishes one item per advance, the oldest first; refuses negative items; ``breaks`` on an item."""

    opened = 0

    def __init__(self, breaks=None):
        FakeStream.opened += 1
        self.queue, self.breaks = [], breaks

    def add(self, key, item):
        if item < 0:
            raise ValueError(f"refused {item}")
        self.queue.append((key, item))

    def advance(self):
        key, item = self.queue.pop(0)
        if item == self.breaks:
            raise RuntimeError(f"broken at {item}")
        return [(key, item * 10)]


def double(items):
    return [item * 10 for item in items]


def test_each_caller_gets_its_own_results_and_refused_items_are_their_exceptions():
    feeder = StreamFeeder(FakeStream, lambda fn, items: fn(items))
    batches = [[1, 2, 3], [4, -5], [6], [-7], list(range(8, 20))]
    with ThreadPoolExecutor(len(batches)) as threads:
        outs = list(threads.map(lambda b: feeder(double, b), batches))
    for batch, out in zip(batches, outs):
        assert len(out) == len(batch)
        for item, result in zip(batch, out):
            if item < 0:
                assert isinstance(result, ValueError) and str(item) in str(result)
            else:
                assert result == item * 10
    assert feeder(double, []) == []


def test_a_broken_stream_hands_its_items_to_the_fallback_and_a_fresh_stream_takes_the_next():
    fallback_calls = []

    def fallback(fn, items):
        fallback_calls.append(list(items))
        return fn(items)

    faults = []
    FakeStream.opened = 0
    feeder = StreamFeeder(lambda: FakeStream(breaks=2), fallback, on_fault=faults.append)
    assert feeder(double, [1, 2, 3]) == [10, 20, 30]  # 1 came from the stream, 2 and 3 from the fallback
    assert fallback_calls == [[2, 3]] and len(faults) == 1 and isinstance(faults[0], RuntimeError)
    assert feeder(double, [4, 5]) == [40, 50] and FakeStream.opened == 2 and fallback_calls == [[2, 3]]


def test_a_fallback_that_raises_fails_its_callers_not_the_loop():
    def fallback(fn, items):
        raise OSError("the device is gone")

    feeder = StreamFeeder(lambda: FakeStream(breaks=1), fallback)
    with pytest.raises(OSError, match="device is gone"):
        feeder(double, [1])
    done = threading.Event()
    result = []
    threading.Thread(target=lambda: (result.append(feeder(double, [3])), done.set()), daemon=True).start()
    assert done.wait(10) and result == [[30]]
