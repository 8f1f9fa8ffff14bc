"""SIGTERM wakes the worker's event loop (``worker.consume.shutdown_wake``): the receiver of
``worker_shutting_down`` leaves the loop's poller something to return for at once."""

from __future__ import annotations

from kombu.asynchronous import Hub, set_event_loop
from kombu.asynchronous.hub import READ

from worker.consume.shutdown_wake import wake_event_loop


def test_a_shutdown_signal_gives_the_event_loop_a_readable_pipe() -> None:
    # Given an event loop with nothing to wait for
    hub = Hub()
    set_event_loop(hub)
    try:
        # When the worker is told to shut down
        wake_event_loop()
        # Then the loop's wait returns with one readable pipe (not after its 5 s timeout)
        events = hub.poller.poll(5)
        assert len(events or []) == 1
        fd, flags = events[0]
        assert flags & READ
        # And once its callback ran, the pipe is gone from the loop
        callback, args = hub.readers[fd]
        callback(*args)
        assert fd not in hub.readers
    finally:
        set_event_loop(None)
        hub.close()


def test_no_event_loop_no_error() -> None:
    # (Flower and the CLI load the app too, without a worker's event loop)
    set_event_loop(None)
    wake_event_loop()
