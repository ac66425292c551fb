"""The overlap helpers: ordered, bounded, failures surface where the consumer can act."""

from __future__ import annotations

import threading
import time

import pytest

from loftq.pipeline import Background, Prefetch


def test_prefetch_yields_in_order_and_runs_ahead() -> None:
    produced: list[int] = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    with Prefetch(items(), depth=1) as ahead:
        seen = []
        for item in ahead:
            time.sleep(0.02)  # the producer fills the queue meanwhile
            seen.append(item)
            assert len(produced) <= item + 3  # one queued, one being made, bounded
    assert seen == [0, 1, 2, 3, 4]


def test_prefetch_raises_the_producers_error_where_its_item_would_come() -> None:
    def items():
        yield 1
        raise ValueError("broken shard")

    seen = []
    with Prefetch(items()) as ahead, pytest.raises(ValueError, match="broken shard"):
        for item in ahead:
            seen.append(item)
    assert seen == [1]


def test_prefetch_close_stops_the_producer_and_discards_unconsumed_items() -> None:
    closed: list[int] = []
    finished = threading.Event()

    def items():
        try:
            for i in range(1000):
                yield i
        finally:
            finished.set()

    ahead = Prefetch(items(), depth=2, discard=closed.append)
    iterator = iter(ahead)
    assert next(iterator) == 0
    time.sleep(0.05)
    ahead.close()
    assert finished.is_set()  # the generator was closed (its with-blocks ran)
    assert closed and closed[0] == 1  # what was made ahead is handed back, in order
    assert len(closed) <= 2


def test_background_runs_calls_in_order() -> None:
    done: list[int] = []
    with Background(depth=1) as behind:
        for i in range(20):
            behind.submit(lambda i=i: done.append(i))
        behind.join()
    assert done == list(range(20))


def test_background_failure_skips_later_calls_and_is_raised() -> None:
    done: list[int] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    behind = Background(depth=4)
    behind.submit(lambda: done.append(1))
    behind.submit(fail)
    behind.submit(lambda: done.append(3))  # must not run: it assumes the failed write happened
    with pytest.raises(OSError, match="No space left"):
        behind.join()
    assert done == [1]


def test_background_raises_at_the_next_submit() -> None:
    behind = Background(depth=1)
    behind.submit(lambda: 1 / 0)
    deadline = time.monotonic() + 5
    with pytest.raises(ZeroDivisionError):
        while time.monotonic() < deadline:
            behind.submit(lambda: None)
            time.sleep(0.01)
    with pytest.raises(ZeroDivisionError):
        behind.join()


def test_background_refuses_calls_once_closed() -> None:
    """A closed Background runs nothing: a submit must fail, not wait on a queue nobody reads."""
    behind = Background(depth=1)
    behind.close()
    with pytest.raises(RuntimeError, match="closed"):
        behind.submit(lambda: None)
