"""Run a pipeline's next stage for the following items in a background thread.

:class:`Prefetcher` takes items from an iterator and prepares each (``prepare(item)``) in one
thread, up to ``depth`` ahead of the consumer. test.py uses it so that, while the main thread
runs the network on one batch and hands its results to the writers, the thread takes the next
batch from the DataLoader and readies its crops on the device (``--decode_on_device``: nvJPEG
decoding, whose host-side share is CPU time). torch's operators release the GIL while they run,
so the two threads overlap.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

_END = object()


def prefetched(items: Iterable, prepare: Callable, depth: int, **kw) -> Iterator:
    """``prepare(x)`` for each ``x`` of ``items``, in order.

    Args:
        items: the items (e.g. a DataLoader's iterator). prepare: the stage run on each.
        depth: items prepared ahead in a thread (a :class:`Prefetcher`); 0: each prepared by the
            consumer itself when it asks.
        **kw: :class:`Prefetcher`'s ``on_thread_start`` and ``name``.

    Returns:
        an iterator with ``stop()`` and ``close()``; an exception of ``items`` or ``prepare``
        is raised to the consumer at the item where it happened.
    """
    return Prefetcher(items, prepare, depth, **kw) if depth > 0 else _InPlace(items, prepare)


class _InPlace:
    def __init__(self, items: Iterable, prepare: Callable):
        self._items, self._prepare, self._done = iter(items), prepare, False

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        return self._prepare(next(self._items))

    def stop(self) -> None:
        self._done = True

    close = stop


class Prefetcher:
    """Iterate ``prepare(x)`` for ``x`` in ``items``, computed ``depth`` items ahead in a thread.

    An exception in ``items`` or ``prepare`` is raised to the consumer at the item where it
    happened, after the items before it. :meth:`close` (also on leaving a ``with`` block) stops the
    thread: it takes no more items, and whatever it had ready is dropped.

    Args:
        items: any iterable, consumed in the thread.
        prepare: called in the thread on each item; its results are what iterating yields, in order.
        depth: how many prepared items may wait (>= 1).
        on_thread_start: runs first in the thread (e.g. to select the CUDA device the consumer uses).
        name: the thread's name.

    Raises:
        ValueError: ``depth`` < 1.
    """

    def __init__(self, items: Iterable, prepare: Callable, depth: int = 2, on_thread_start: Callable | None = None,
                 name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._items, self._prepare, self._start = items, prepare, on_thread_start
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        """Queue ``entry`` unless closed meanwhile; False when closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            if self._start is not None:
                self._start()
            for item in self._items:
                if self._stop.is_set() or not self._put((self._prepare(item), None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, e))
            return
        self._put((_END, None))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                value, error = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # closed, or died without a word
                    self._done = True
                    raise StopIteration from None
        if error is not None:
            self._done = True
            raise error
        if value is _END:
            self._done = True
            raise StopIteration
        return value

    def stop(self) -> None:
        """Tell the thread to stop and drop what it had ready, without waiting for it."""
        self._stop.set()
        self._done = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the item it is preparing, if any)."""
        self.stop()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
