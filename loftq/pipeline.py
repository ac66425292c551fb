"""Overlap of reading, computing and writing: two small thread helpers.

A conversion alternates between I/O (reading the next tensor or downloading the next shard,
writing or uploading the finished ones) and compute (fitting a layer). File reads and
writes, hashing and torch kernels all release the GIL, so plain threads overlap them; the
queues are bounded, so memory stays at a fixed number of items in flight whatever the model's
size. Written by hand because neither ``concurrent.futures`` (unbounded queue, no ordered
streaming) nor a library we already depend on offers a bounded, ordered, fail-fast pipe.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch(Generic[T]):
    """Iterates ``items`` on a thread, at most ``depth`` items ahead of the consumer.

    The producer's exception is raised in the consumer at the point where its item would
    have come. ``close()`` (or leaving the ``with`` block) stops the producer early and hands
    the items made but never consumed to ``discard`` (to release what they hold).
    """

    def __init__(
        self, items: Iterator[T], depth: int = 1, name: str = "prefetch", discard: Callable[[T], object] | None = None
    ) -> None:
        self._items = items
        self._discard = discard
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(exc))
            return
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if self._discard is not None and item is not _DONE and not isinstance(item, _Failure):
                self._discard(item)  # type: ignore[arg-type]

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Background:
    """Runs submitted calls one at a time, in order, on a thread; at most ``depth`` wait.

    The first failure is raised in the submitting thread at the next ``submit`` or at
    ``join``; calls submitted after it are skipped, so a failed write is never followed by
    a write that assumes it succeeded.
    """

    def __init__(self, depth: int = 2, name: str = "background") -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (call := self._queue.get()) is not None:
            if self._error is None:
                try:
                    call()
                except BaseException as exc:  # noqa: BLE001 - raised in the submitter
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, call: Callable[[], object]) -> None:
        """Raises once closed: nothing would run the call, and a full queue would block forever."""
        self._raise()
        if self._closed:
            raise RuntimeError("submit to a Background that is closed")
        self._queue.put(call)

    def join(self) -> None:
        """Wait for every submitted call; raise the first failure."""
        self._stop()
        self._raise()

    def _stop(self) -> None:
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        """Wait for the thread to end without raising (for cleanup after another failure)."""
        self._stop()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
