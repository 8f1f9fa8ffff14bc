"""A warm shutdown that begins at once: SIGTERM wakes the worker's event loop.

Celery's SIGTERM handler sets a flag (``state.should_stop``) that the event loop reads between
ticks, and an idle tick waits in ``epoll`` for up to a second (the broker's blocking wait, the
hub's timers). Measured here, six warm shutdowns of an idle worker each: 1.57-2.42 s without this
(two of six near 2.4 s), 1.57-1.62 s with it; the rest is billiard's pool processes, each of which
sleeps a second before it exits, and Celery's timer thread (0.5 s).

The handler sends ``worker_shutting_down`` first, in the main process; this module's receiver
gives the event loop a pipe to watch, with a byte in it, so the ``epoll`` (which Python resumes
after the signal with the time left) returns at once, and the loop's next turn starts the
shutdown.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from celery.signals import worker_shutting_down
from kombu.asynchronous import get_event_loop

__all__ = ["wake_event_loop"]


def wake_event_loop(**_: Any) -> None:
    """Make the event loop's current wait return (a receiver of ``worker_shutting_down``, which
    runs in the signal handler: only a pipe, a registration and a write)."""
    hub = get_event_loop()
    if hub is None:
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def woken() -> None:
        hub.remove_reader(read_end)  # type: ignore[no-untyped-call]
        os.close(read_end)

    hub.add_reader(read_end, woken)  # type: ignore[no-untyped-call]
    with contextlib.suppress(OSError):
        os.write(write_end, b"\0")
    os.close(write_end)


worker_shutting_down.connect(wake_event_loop, weak=False)
