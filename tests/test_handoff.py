"""modelcache.store.handoff: an iterator run ahead in its own thread, bounded, in order, stoppable (issue 13)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from modelcache.store.handoff import Handoff


def _settled(count: list[int], *, within: float = 5.0) -> int:
    """``count[0]`` once it has not moved for 0.2 s (the producer is blocked), within ``within`` s."""
    deadline = time.monotonic() + within
    last, since = count[0], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if count[0] != last:
            last, since = count[0], time.monotonic()
        elif time.monotonic() - since >= 0.2:
            break
    return last


def test_items_come_in_order_from_another_thread() -> None:
    threads: set[str] = set()

    def source() -> Iterator[int]:
        for n in range(1000):
            threads.add(threading.current_thread().name)
            yield n

    with Handoff(source(), depth=4, name="mc-test-source") as handoff:
        assert list(handoff) == list(range(1000))
    assert threads == {"mc-test-source"}


def test_the_source_runs_at_most_depth_items_ahead_of_the_reader() -> None:
    """A source that could make far more (a gzip bomb's inflater) is held back by the queue's bound."""
    made = [0]

    def source() -> Iterator[int]:
        for n in range(1000):
            made[0] += 1
            yield n

    with Handoff(source(), depth=3, name="mc-test-source") as handoff:
        assert next(handoff) == 0
        # One taken, three queued, one made and waiting for room.
        assert _settled(made) == 1 + 3 + 1
        assert [next(handoff) for _ in range(5)] == [1, 2, 3, 4, 5]
        assert _settled(made) == 6 + 3 + 1


def test_an_error_of_the_source_comes_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise EOFError("cut short")

    with Handoff(source(), depth=8, name="mc-test-source") as handoff:
        got = []
        with pytest.raises(EOFError, match="cut short"):
            for item in handoff:
                got.append(item)
        assert got == [1, 2]
        with pytest.raises(StopIteration):
            next(handoff)


def test_closing_stops_the_source_before_close_returns() -> None:
    """The reader may close what the source reads from (a file) once close has returned."""
    ended: list[str] = []

    def endless() -> Iterator[int]:
        n = 0
        try:
            while True:
                yield n
                n += 1
        finally:
            ended.append(threading.current_thread().name)

    handoff = Handoff(endless(), depth=2, name="mc-test-source")
    assert [next(handoff), next(handoff)] == [0, 1]
    handoff.close()
    assert ended == ["mc-test-source"]  # closed in its own thread, and before close returned
    with pytest.raises(StopIteration):
        next(handoff)
    assert "mc-test-source" not in {t.name for t in threading.enumerate()}


def test_closing_a_source_still_waiting_for_input_returns_once_that_input_ends() -> None:
    """A source blocked on its own input (the network) stops at its next item once that input comes."""
    gate = threading.Event()

    def waiting() -> Iterator[int]:
        yield 0
        gate.wait(10)
        yield 1
        yield 2

    handoff = Handoff(waiting(), depth=1, name="mc-test-source")
    assert next(handoff) == 0
    closer = threading.Thread(target=handoff.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # still waiting: the source is inside its input's wait
    gate.set()
    closer.join(5)
    assert not closer.is_alive()


def test_a_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Handoff(iter(()), depth=0, name="mc-test-source")
