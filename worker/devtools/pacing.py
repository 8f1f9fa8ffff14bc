"""Sending events on a clock, for ``itrain produce`` and the benchmark.

A paced run offers a steady load (``rate`` events a second) in small slices, 20 a second, so
that latency is measured at that load and not at whatever the producer can push; an unpaced
run sends large slices as fast as it can.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["send_paced", "slice_size"]

_Item = TypeVar("_Item")
_Handle = TypeVar("_Handle")


def slice_size(rate: float | None) -> int:
    """Items per slice: a twentieth of a second's worth at ``rate``, else 5,000."""
    return max(1, int(rate / 20)) if rate else 5000


def send_paced(
    items: Sequence[_Item],
    send: Callable[[Sequence[_Item]], Sequence[_Handle]],
    *,
    rate: float | None,
    size: int | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> tuple[list[_Handle], list[float]]:
    """Call ``send`` on consecutive slices of ``size`` items (``slice_size(rate)`` by default).

    With a ``rate``, the slice that starts at item ``i`` is sent no earlier than ``i / rate``
    seconds after the first. Returns everything ``send`` returned, in order, and each item's
    send time (epoch seconds, read just before its slice went). ``on_sent`` gets the number of
    handles so far after each slice (for a progress bar).
    """
    step = size or slice_size(rate)
    handles: list[_Handle] = []
    sent_at: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(items), step):
        if rate:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        now = time.time()
        part = send(items[i : i + step])
        handles.extend(part)
        sent_at.extend([now] * len(part))
        if on_sent is not None:
            on_sent(len(handles))
    return handles, sent_at
