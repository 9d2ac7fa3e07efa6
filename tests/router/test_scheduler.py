"""Fair sharing of router slots between sites (asyncio, no Ray)."""

import asyncio

import pytest

from serve.router.scheduler import FairScheduler
from serve.errors import TooManyRequestsError


def _run(coro):
    return asyncio.run(coro)


def test_a_late_site_is_served_before_an_earlier_flood_drains():
    async def main():
        order = []
        gate = asyncio.Event()

        def job(name):
            async def fn():
                order.append(name)
                await gate.wait()
                return name
            return fn

        s = FairScheduler(slots=1, site_limit=lambda site: 100)
        futs = [s.submit("A", f"a{i}", job(f"a{i}")) for i in range(10)]
        futs.append(s.submit("B", "b0", job("b0")))
        gate.set()
        await asyncio.gather(*futs)
        return order

    order = _run(main())
    # a0 had the slot before b0 arrived; round-robin gives b0 the next one, FIFO would give it the last
    assert order[:2] == ["a0", "b0"]
    assert order[2:] == [f"a{i}" for i in range(1, 10)]


def test_sites_alternate_when_both_have_queues():
    async def main():
        order = []

        def job(name):
            async def fn():
                order.append(name)
            return fn

        s = FairScheduler(slots=1, site_limit=lambda site: 100)
        futs = [s.submit(site, f"{site}{i}", job(f"{site}{i}")) for i in range(3) for site in ("A",)]
        futs += [s.submit("B", f"B{i}", job(f"B{i}")) for i in range(3)]
        await asyncio.gather(*futs)
        return order

    assert _run(main()) == ["A0", "B0", "A1", "B1", "A2", "B2"]


def test_site_limit_is_429_and_frees_up():
    async def main():
        gate = asyncio.Event()

        async def fn():
            await gate.wait()

        s = FairScheduler(slots=2, site_limit=lambda site: 2)
        f1, f2 = s.submit("A", "1", fn), s.submit("A", "2", fn)
        with pytest.raises(TooManyRequestsError) as e:
            s.submit("A", "3", fn)
        assert e.value.status == 429 and e.value.retryable
        s.submit("B", "b", fn)  # another site is not affected
        gate.set()
        await asyncio.gather(f1, f2)
        await asyncio.sleep(0)
        f4 = s.submit("A", "4", fn)
        await f4

    _run(main())


def test_slots_bound_concurrency_and_errors_reach_the_waiter():
    async def main():
        running, peak = 0, 0

        async def fn():
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

        async def boom():
            raise ValueError("bad volume")

        s = FairScheduler(slots=3, site_limit=lambda site: 100)
        futs = [s.submit("A" if i % 2 else "B", str(i), fn) for i in range(12)]
        bad = s.submit("A", "bad", boom)
        await asyncio.gather(*futs)
        with pytest.raises(ValueError, match="bad volume"):
            await bad
        assert peak == 3
        assert s.stats().running == 0 and not s.stats().active

    _run(main())


def test_cancel_stops_queued_and_running_jobs_and_refuses_unknown_ones():
    async def main():
        gate = asyncio.Event()

        async def fn():
            await gate.wait()

        s = FairScheduler(slots=1, site_limit=lambda site: 100)
        running, queued = s.submit("A", "r", fn), s.submit("A", "q", fn)
        await asyncio.sleep(0)
        assert s.cancel("q") and queued.cancelled()
        assert s.cancel("r")
        await asyncio.sleep(0)
        assert running.cancelled()
        assert not s.cancel("r") and not s.cancel("unknown")
        assert s.stats().running == 0 and not s.stats().active

    _run(main())


def test_cancel_before_the_task_first_runs_releases_the_slot():
    """A job handed a slot and cancelled in the same loop turn never runs its body; the slot must come back."""
    async def main():
        async def fn():
            return "ran"

        s = FairScheduler(slots=1, site_limit=lambda site: 1)
        first = s.submit("A", "a", fn)
        assert s.cancel("a")  # its task exists but has not taken a step
        await asyncio.sleep(0.01)
        assert first.cancelled() and s.stats().running == 0 and not s.stats().active
        assert await s.submit("A", "a2", fn) == "ran"  # neither the slot nor the site's quota leaked

    _run(main())


def test_the_health_check_fails_once_the_jobs_event_loop_has_stopped():
    """Jobs queued and running on a loop that no longer runs will never finish or start."""
    from serve.router.scheduler import SchedulerStalledError

    sched = FairScheduler(1, lambda site: 10)
    loop = asyncio.new_event_loop()

    async def one_running_one_queued():
        started = asyncio.Event()

        async def job():
            started.set()
            await asyncio.sleep(3600)

        sched.submit("a", "j1", job)
        sched.submit("a", "j2", job)
        await started.wait()
        sched.check()  # healthy while its loop runs: one running, one waiting for the only slot

    try:
        loop.run_until_complete(one_running_one_queued())
        with pytest.raises(SchedulerStalledError, match="event loop .* has stopped, with 1 job\\(s\\) running and 1 "
                                                        "queued"):
            sched.check()
    finally:
        tasks = asyncio.all_tasks(loop)
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()
    FairScheduler(1, lambda site: 10).check()  # a scheduler that never had work is healthy
