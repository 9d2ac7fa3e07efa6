"""The event intake's per-site fair scheduler, and the sites' job limits it reads.

Event jobs wait in one queue per site and run round-robin over the sites with
work, at most each site's limit at once (:class:`SiteScheduler`), so one site's
flood of events holds up only itself; :class:`SiteLimits` caches the limits
(the router's tenants file, in the cluster).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)


class SiteScheduler:
    """Runs callables on ``workers`` threads: round-robin over the sites with work, each site's at most its limit.

    Each site has a FIFO queue. A free worker takes the next job of the site served
    least recently among those with a job waiting and fewer than their limit running,
    so a site that queues a thousand jobs waits behind itself, not in front of another
    site's one.

    Args:
        workers: threads (jobs running at once, all sites).
        limits: each site's limit of jobs running at once (looked at by each worker before it picks;
            a site it does not name gets ``default_limit``).
        default_limit: the limit of a site ``limits`` does not name.
        name: the threads' name prefix.
    """

    def __init__(self, workers: int, limits: Callable[[], Mapping[str, int]], default_limit: int = 1,
                 name: str = "mriseg-intake"):
        self._limits = limits
        self.default_limit = max(1, default_limit)
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[tuple[Callable[[], Any], Future]]] = OrderedDict()
        self._running: dict[str, int] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, site: str, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` for ``site``.

        Args:
            site: whose job it is.
            fn: the job.

        Returns:
            A future of its result (cancelled if the scheduler closes first).
        """
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the intake's scheduler is closed")
            if site not in self._queues:
                self._queues[site] = deque()
                self._queues.move_to_end(site, last=False)  # never served: first in the round
            self._queues[site].append((fn, fut))
            self._cond.notify()
        return fut

    def queued(self) -> dict[str, int]:
        """Jobs waiting, by site."""
        with self._cond:
            return {s: len(q) for s, q in self._queues.items() if q}

    def running(self) -> dict[str, int]:
        """Jobs running, by site."""
        with self._cond:
            return {s: n for s, n in self._running.items() if n}

    def _pick(self, limits: Mapping[str, int]) -> tuple[str, Callable[[], Any], Future] | None:
        for site, q in self._queues.items():
            if q and self._running.get(site, 0) < max(1, int(limits.get(site, self.default_limit))):
                self._queues.move_to_end(site)  # served: to the back of the round
                fn, fut = q.popleft()
                self._running[site] = self._running.get(site, 0) + 1
                return site, fn, fut
        return None

    def _work(self) -> None:
        while True:
            try:
                limits = self._limits()  # outside the lock: it may ask the router
            except Exception:  # noqa: BLE001 - a limit look-up must not kill a worker
                log.warning("could not look up the sites' job limits", exc_info=True)
                limits = {}
            with self._cond:
                if self._closed:
                    return
                picked = self._pick(limits)
                if picked is None:
                    # woken by a new job or a finished one; the timeout sees a limit raised meanwhile
                    self._cond.wait(1.0)
                    continue
            site, fn, fut = picked
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                        fut.set_exception(e)
            finally:
                with self._cond:
                    self._running[site] -= 1
                    self._cond.notify_all()

    def close(self) -> None:
        """Stop taking jobs; jobs still waiting are cancelled (pushed ones stay held in S3)."""
        with self._cond:
            self._closed = True
            for q in self._queues.values():
                while q:
                    q.popleft()[1].cancel()
            self._cond.notify_all()


class SiteLimits:
    """The sites' job limits from ``fetch``, asked for at most every ``ttl_s``; the last answer while it fails.

    Args:
        fetch: returns site name -> limit (the router's tenants file).
        ttl_s: how long an answer is used.
    """

    def __init__(self, fetch: Callable[[], Mapping[str, int]], ttl_s: float = 5.0):
        self._fetch, self.ttl_s = fetch, ttl_s
        self._limits: dict[str, int] = {}
        self._next = 0.0
        self._failing = False
        self._lock = threading.Lock()

    def __call__(self) -> Mapping[str, int]:
        now = time.monotonic()
        if now >= self._next and self._lock.acquire(blocking=False):  # one thread asks; the others use the last
            try:
                self._next = now + self.ttl_s
                self._limits = dict(self._fetch())
                self._failing = False
            except Exception as e:  # noqa: BLE001 - the router starting or restarting
                if not self._failing:
                    log.warning("could not read the sites' job limits from the router (%s); using the last "
                                "known (1 for a site not known yet)", type(e).__name__)
                self._failing = True
            finally:
                self._lock.release()
        return self._limits
