"""The time source of leases and backoffs, injectable so that tests advance time instead of waiting for it.

Code that stamps a lease or a ``not_before`` and then waits for it to pass (:class:`serve.jobs.store.JobStore`,
:class:`serve.jobs.pushes.PushJournal`, :class:`serve.jobs.intake.IntakeWorker`) takes a ``clock``:
:data:`SYSTEM_CLOCK` by default, a :class:`ManualClock` in tests, which then call
:meth:`ManualClock.advance` where the code would otherwise sleep for real.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time (epoch seconds, as stored in records) and waits measured on that time."""

    def time(self) -> float:
        """Seconds since the epoch."""
        ...

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Block until ``event`` is set or ``seconds`` of this clock's time have passed; True if it is set."""
        ...


class SystemClock:
    """The real clock: :func:`time.time` and :meth:`threading.Event.wait`."""

    def time(self) -> float:
        """Seconds since the epoch, from :func:`time.time`.

        Returns:
            The current epoch time.
        """
        return time.time()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait on ``event`` for at most ``seconds`` of real time.

        Args:
            event: set to end the wait early.
            seconds: the longest wait.

        Returns:
            True if ``event`` was set.
        """
        return event.wait(seconds)


#: What every ``clock`` parameter defaults to.
SYSTEM_CLOCK: Clock = SystemClock()


class ManualClock:
    """A clock that moves only when :meth:`advance` is called; waits on it end when it has moved far enough.

    It starts at the real epoch time (records stamped with it look like any others) and is thread-safe:
    one test thread advances it while worker threads wait on it.
    """

    #: How often (real seconds) a waiter looks at its event: an Event cannot be waited on together with a
    #: condition, so a set event is noticed within this much real time.
    POLL_S = 0.005

    def __init__(self, start: float | None = None):
        self._now = time.time() if start is None else float(start)
        self._cond = threading.Condition()

    def time(self) -> float:
        """This clock's current epoch time.

        Returns:
            The time it was started at plus everything :meth:`advance` added.
        """
        with self._cond:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time on by ``seconds`` and wake the waits that have run out.

        Args:
            seconds: how far to move (not negative: time never goes back).

        Returns:
            The new time.
        """
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds:g} s); advance it by 0 or more")
        with self._cond:
            self._now += seconds
            self._cond.notify_all()
            return self._now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Block until ``event`` is set or this clock has advanced ``seconds`` past now.

        Args:
            event: set to end the wait early.
            seconds: how far the clock must advance to end the wait.

        Returns:
            True if ``event`` was set.
        """
        with self._cond:
            deadline = self._now + seconds
            while not event.is_set() and self._now < deadline:
                self._cond.wait(self.POLL_S)
        return event.is_set()
