"""util.prefetch.Prefetcher: order, errors where they happen, bounded look-ahead, clean stop."""
import threading
import time

import pytest

from util.prefetch import Prefetcher, prefetched


def test_yields_prepared_items_in_order_from_another_thread():
    seen = []

    def prepare(x):
        seen.append(threading.current_thread().name)
        return x * x

    with Prefetcher(range(20), prepare, depth=3, name="pf") as p:
        assert list(p) == [x * x for x in range(20)]
        assert list(p) == []  # exhausted stays exhausted
    assert set(seen) == {"pf"}


def test_on_thread_start_runs_in_the_thread_before_any_item():
    order = []
    with Prefetcher(range(3), lambda x: order.append(("item", threading.current_thread().name)) or x,
                    on_thread_start=lambda: order.append(("start", threading.current_thread().name)),
                    name="pf") as p:
        assert list(p) == [0, 1, 2]
    assert order[0] == ("start", "pf") and [o[0] for o in order[1:]] == ["item"] * 3


@pytest.mark.parametrize("where", ["prepare", "items"])
def test_an_error_reaches_the_consumer_after_the_items_before_it(where):
    def items():
        for i in range(5):
            if where == "items" and i == 3:
                raise OSError("disk gone")
            yield i

    def prepare(x):
        if where == "prepare" and x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with Prefetcher(items(), prepare, depth=2) as p:
        with pytest.raises(OSError if where == "items" else ValueError, match="disk gone|bad item 3"):
            for x in p:
                got.append(x)
        with pytest.raises(StopIteration):
            next(p)
    assert got == [0, 1, 2]


def counted(n: int, taken: list):
    """0..n-1, each appended to ``taken`` as it is taken."""
    for i in range(n):
        taken.append(i)
        yield i


def test_looks_at_most_depth_items_ahead():
    taken = []
    p = Prefetcher(counted(100, taken), lambda x: x, depth=2)
    try:
        assert next(p) == 0
        time.sleep(0.3)  # let the thread run as far as it may
        # consumed 1, queued 2, one more prepared and waiting for room
        assert len(taken) <= 1 + 2 + 1
    finally:
        p.close()


def test_close_stops_the_thread_and_takes_no_more_items():
    taken = []
    p = Prefetcher(counted(10_000, taken), lambda x: x, depth=2)
    next(p)
    p.close()
    n = len(taken)
    assert not p._thread.is_alive()
    time.sleep(0.2)
    assert len(taken) == n < 10
    with pytest.raises(StopIteration):
        next(p)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Prefetcher([], lambda x: x, depth=0)


def test_depth_zero_prepares_in_the_consumers_thread():
    names = []
    p = prefetched(range(4), lambda x: names.append(threading.current_thread().name) or -x, 0, name="unused")
    assert next(p) == 0 and names == [threading.current_thread().name]
    p.stop()
    with pytest.raises(StopIteration):
        next(p)
    assert list(prefetched(range(3), lambda x: -x, 0)) == [0, -1, -2]
