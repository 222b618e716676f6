"""The engine's shared connection slots (transfer/slots.py): a bound, fairness, no leaks."""

from __future__ import annotations

import asyncio

import pytest

from modelcache.transfer.slots import FairSlots


def test_never_more_than_n_and_least_served_first() -> None:
    """Slots go to the key holding the fewest; one key alone gets them all."""
    async def main() -> None:
        slots = FairSlots(2)
        held, peak, order = set(), 0, []
        gate = asyncio.Event()

        async def job(key: str, n: int) -> None:
            nonlocal peak
            async with slots.slot(key):
                held.add((key, n))
                peak = max(peak, len(held))
                order.append(key)
                await gate.wait()
                held.discard((key, n))

        # "a" asks for four slots before "b" asks for four: first come would give "a" both.
        tasks = [asyncio.create_task(job("a", n)) for n in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(job("b", n)) for n in range(4)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a", "a"]  # both free slots were taken at once, before "b" asked
        gate.set()
        await asyncio.gather(*tasks)
        assert peak == 2
        # Each release hands the slot to the key holding fewer: "b" gets in as soon as one frees.
        assert order[2] == "b" and sorted(order) == ["a"] * 4 + ["b"] * 4
        assert slots.held("a") == slots.held("b") == 0

        alone = [asyncio.create_task(job("c", n)) for n in range(3)]
        gate.clear()
        for _ in range(5):
            await asyncio.sleep(0)
        assert slots.held("c") == 2
        gate.set()
        await asyncio.gather(*alone)

    asyncio.run(main())


def test_interleaves_keys_one_each() -> None:
    """Once every key is queued, a freed slot goes to a key holding none, not to the one holding most."""
    async def main() -> None:
        slots = FairSlots(3)
        snapshots = []

        async def job(key: str) -> None:
            async with slots.slot(key):
                snapshots.append(tuple(slots.held(k) for k in "xyz"))
                await asyncio.sleep(0.001)

        await asyncio.gather(*(job(k) for k in "xxxxyyyyzzzz"))
        # "x" came first and found all three slots free; as they were freed, "y" and "z" got one
        # each before "x" got its fourth, and then every key held exactly one.
        assert snapshots[:3] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
        assert snapshots[3:6] == [(1, 1, 1)] * 3
        assert len(snapshots) == 12

    asyncio.run(main())


@pytest.mark.parametrize("when", ["waiting", "just granted"])
def test_cancelled_waiters_leak_nothing(when: str) -> None:
    """A waiter cancelled while queued, or right after its slot was granted, leaves the count whole."""
    async def main() -> None:
        slots = FairSlots(1)
        entered = []

        async def waiter() -> None:
            async with slots.slot("w"):
                entered.append("w")

        holding = slots.slot("h")
        await holding.__aenter__()
        second = asyncio.create_task(waiter())
        await asyncio.sleep(0)  # queued behind "h"
        if when == "just granted":
            await holding.__aexit__(None, None, None)  # grants the slot to `second`, which has not run
            second.cancel()
        else:
            second.cancel()
            await asyncio.sleep(0)
            await holding.__aexit__(None, None, None)
        with pytest.raises(asyncio.CancelledError):
            await second
        assert entered == []
        assert slots.held("w") == 0 and slots.held("h") == 0
        async with asyncio.timeout(1):  # the one slot is free again
            async with slots.slot("z"):
                pass

    asyncio.run(main())
