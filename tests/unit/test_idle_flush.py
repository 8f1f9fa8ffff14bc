"""``IdleFlush``: what a pool process keeps for its next round trip is written once it is idle."""

from __future__ import annotations

import threading
import time

import pytest

from worker.consume.idle_flush import IdleFlush


class Recorder:
    """A flush that records when it ran."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.flushed = threading.Event()

    def __call__(self) -> None:
        self.calls.append(time.monotonic())
        self.flushed.set()


def test_a_touch_flushes_once_after_the_delay() -> None:
    # Given an idle flush of 50 ms
    flush = Recorder()
    calls, flushed = flush.calls, flush.flushed
    idle = IdleFlush(flush, 0.05)
    # When a job leaves something to flush
    touched = time.monotonic()
    idle.touch()
    # Then it is flushed, no sooner than the delay, and once
    assert flushed.wait(10)
    assert calls[0] - touched >= 0.05
    time.sleep(0.2)
    assert len(calls) == 1


def test_jobs_that_keep_coming_postpone_the_flush() -> None:
    # Given an idle flush of 1 s
    flush = Recorder()
    calls, flushed = flush.calls, flush.flushed
    idle = IdleFlush(flush, 1.0)
    # When jobs keep coming every 50 ms for half a second, each leaving something to flush
    for _ in range(10):
        idle.touch()
        time.sleep(0.05)
    last = time.monotonic()
    # Then nothing was flushed while they came, and one flush follows the last
    assert calls == []
    assert flushed.wait(10)
    assert len(calls) == 1
    assert calls[0] >= last


def test_a_flush_that_raises_is_logged_and_the_next_touch_flushes_again(caplog) -> None:
    # Given a flush that fails the first time (Redis down)
    calls: list[int] = []
    second = threading.Event()

    def flush() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("Redis is down")
        second.set()

    idle = IdleFlush(flush, 0.02)
    with caplog.at_level("WARNING", logger="itrain.idle_flush"):
        idle.touch()
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        # When a later job leaves something again
        time.sleep(0.05)
        idle.touch()
        # Then that one is flushed: the thread outlived the failure, which was logged
        assert second.wait(10)
    assert "Redis is down" in caplog.text


def test_a_delay_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="delay > 0"):
        IdleFlush(lambda: None, 0)
