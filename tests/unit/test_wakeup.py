"""Waking stream coroutines: shared sweeps for long waits, precise timers for short ones."""

from __future__ import annotations

import asyncio
import threading

from croupier.server.serving.wakeup import COARSE_MIN_S, CoarseTimers, Wakeup


def test_a_long_wait_ends_at_the_first_sweep_past_its_deadline() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        timers = CoarseTimers()
        w = Wakeup(loop, timers)
        task = loop.create_task(w.wait(5.0))
        await asyncio.sleep(0)
        assert list(timers.due) == [w]
        deadline = timers.due[w]
        assert timers.fire(deadline - 0.5) == 0
        await asyncio.sleep(0)
        assert not task.done()
        assert timers.fire(deadline) == 1
        await asyncio.wait_for(task, 1.0)
        assert timers.due == {} and w.fut is None

    asyncio.run(go())


def test_a_long_wait_woken_from_another_thread_leaves_no_entry() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        timers = CoarseTimers()
        w = Wakeup(loop, timers)
        task = loop.create_task(w.wait(60.0))
        await asyncio.sleep(0)
        assert w in timers.due
        t = threading.Thread(target=w)
        t.start()
        t.join()
        await asyncio.wait_for(task, 5.0)
        assert timers.due == {}
        assert timers.fire(loop.time() + 120.0) == 0

    asyncio.run(go())


def test_a_wake_between_arm_and_wait_is_not_lost() -> None:
    async def go() -> None:
        timers = CoarseTimers()
        w = Wakeup(asyncio.get_running_loop(), timers)
        w.arm()
        w()
        await asyncio.wait_for(w.wait(60.0), 1.0)  # returns at once: the flag was set
        assert timers.due == {}

    asyncio.run(go())


def test_a_short_wait_keeps_a_timer_of_its_own() -> None:
    async def go() -> None:
        timers = CoarseTimers()
        w = Wakeup(asyncio.get_running_loop(), timers)
        task = asyncio.get_running_loop().create_task(w.wait(COARSE_MIN_S / 20))
        await asyncio.sleep(0)
        assert timers.due == {}  # not on the shared sweep
        await asyncio.wait_for(task, 5.0)  # its own timer ends it, no sweep needed

    asyncio.run(go())


