"""Fair sharing of the router's job slots between sites.

Each site has its own FIFO queue; a bounded number of slots is handed out
round-robin over the sites with work waiting, so a flood from one site waits
behind itself, not in front of another site's request. A site with more
than its limit of jobs queued or running is refused (429).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from serve.errors import TooManyRequestsError

JobFn = Callable[[], Awaitable[object]]


@dataclass
class _Entry:
    job_id: str
    site: str
    fn: JobFn
    future: asyncio.Future
    task: asyncio.Task | None = None
    start_seq: int | None = None
    released: bool = False


@dataclass
class SchedulerStats:
    running: int
    queued: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)


class SchedulerStalledError(RuntimeError):
    """The scheduler cannot start queued jobs any more: the router replica is unhealthy."""


class FairScheduler:
    """Round-robin over per-site queues with ``slots`` jobs running at once."""

    def __init__(self, slots: int, site_limit: Callable[[str], int]):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self._site_limit = site_limit
        self._queues: OrderedDict[str, deque[_Entry]] = OrderedDict()
        self._entries: dict[str, _Entry] = {}
        self._active: dict[str, int] = {}
        self._running = 0
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the jobs run on, from the first submit

    def submit(self, site: str, job_id: str, fn: JobFn) -> asyncio.Future:
        """Queue ``fn``; the returned future resolves to its result. 429 beyond the site's limit."""
        limit = self._site_limit(site)
        if self._active.get(site, 0) >= limit:
            raise TooManyRequestsError(
                f"site {site} already has {limit} job(s) queued or running, its limit; "
                f"retry after one finishes")
        self._loop = asyncio.get_running_loop()
        fut = self._loop.create_future()
        entry = _Entry(job_id, site, fn, fut)
        if site not in self._queues:
            # Sites are kept least-recently-served first; a new site has never been served.
            self._queues[site] = deque()
            self._queues.move_to_end(site, last=False)
        self._queues[site].append(entry)
        self._entries[job_id] = entry
        self._active[site] = self._active.get(site, 0) + 1
        self._dispatch()
        return fut

    def active(self, site: str) -> int:
        """The site's jobs queued or running."""
        return self._active.get(site, 0)

    def start_seq(self, job_id: str) -> int | None:
        """The order in which the job got a slot (0 = first ever), None while queued."""
        e = self._entries.get(job_id)
        return e.start_seq if e else None

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job. False if unknown or already finished."""
        e = self._entries.get(job_id)
        if e is None or e.future.done():
            return False
        if e.task is None:
            self._queues[e.site].remove(e)
            self._finish(e)
            e.future.cancel()
        else:
            e.task.cancel()
        return True

    def check(self) -> None:
        """Raise when queued work can no longer start: the jobs' event loop stopped, or dispatch stalled.

        Call it from the jobs' own event loop (the ingress's health check does), so that a loop that is
        blocked shows up as a health check that does not answer.

        Raises:
            SchedulerStalledError: saying which, with the number of jobs waiting.
        """
        queued = sum(len(q) for q in self._queues.values())
        if self._loop is not None and (self._running or queued) and \
                (self._loop.is_closed() or not self._loop.is_running()):
            raise SchedulerStalledError(f"the event loop that runs the router's jobs has stopped, with "
                                        f"{self._running} job(s) running and {queued} queued")
        if queued and self._running < self.slots:  # _dispatch fills free slots whenever a job is queued
            raise SchedulerStalledError(f"{queued} job(s) wait while {self.slots - self._running} of "
                                        f"{self.slots} slot(s) are free: the scheduler stopped dispatching")

    def stats(self) -> SchedulerStats:
        return SchedulerStats(self._running, {s: len(q) for s, q in self._queues.items() if q},
                              {s: n for s, n in self._active.items() if n})

    # -- internals ----------------------------------------------------------
    def _next(self) -> _Entry | None:
        for site in list(self._queues):
            q = self._queues[site]
            if q:
                # The served site goes to the back of the round.
                self._queues.move_to_end(site)
                return q.popleft()
        return None

    def _dispatch(self) -> None:
        while self._running < self.slots:
            e = self._next()
            if e is None:
                return
            self._running += 1
            e.start_seq = next(self._seq)
            e.task = asyncio.ensure_future(self._run(e))
            # a task cancelled before its first step never runs _run's body: release the slot here instead
            e.task.add_done_callback(lambda _task, e=e: self._release(e))

    async def _run(self, e: _Entry) -> None:
        try:
            result = await e.fn()
        except asyncio.CancelledError:
            if not e.future.done():
                e.future.cancel()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            if not e.future.done():
                e.future.set_exception(exc)
        else:
            if not e.future.done():
                e.future.set_result(result)
        finally:
            self._release(e)

    def _release(self, e: _Entry) -> None:
        """Hand the slot back once per job: from ``_run``, or when its task ends without running."""
        if e.released:
            return
        e.released = True
        if not e.future.done():
            e.future.cancel()
        self._running -= 1
        self._finish(e)
        self._dispatch()

    def _finish(self, e: _Entry) -> None:
        self._active[e.site] = max(0, self._active.get(e.site, 0) - 1)
        self._entries.pop(e.job_id, None)
