"""The injectable clock of leases and backoffs (serve.clock): a ManualClock's waits end when it is moved on."""

from __future__ import annotations

import threading
import time

import pytest

from serve.clock import SYSTEM_CLOCK, ManualClock


def test_a_wait_on_a_manual_clock_ends_when_the_clock_has_moved_far_enough_not_before():
    clock = ManualClock(start=1000.0)
    stop = threading.Event()
    ended: list[bool] = []
    waiter = threading.Thread(target=lambda: ended.append(clock.wait(stop, 10.0)))
    waiter.start()
    clock.advance(9.5)
    waiter.join(0.2)
    assert waiter.is_alive() and clock.time() == 1009.5  # 10 s have not passed on the clock
    clock.advance(0.5)
    waiter.join(5)
    assert not waiter.is_alive() and ended == [False]


def test_a_wait_on_a_manual_clock_ends_at_once_when_its_event_is_set():
    clock, stop = ManualClock(), threading.Event()
    waiter = threading.Thread(target=clock.wait, args=(stop, 3600.0))
    waiter.start()
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive()
    assert clock.wait(stop, 3600.0) is True


def test_a_manual_clock_starts_at_the_real_time_and_never_goes_back():
    clock = ManualClock()
    assert abs(clock.time() - time.time()) < 5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)


def test_the_system_clock_is_the_real_one():
    assert abs(SYSTEM_CLOCK.time() - time.time()) < 1
    assert SYSTEM_CLOCK.wait(threading.Event(), 0.01) is False
