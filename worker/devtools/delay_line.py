"""One direction of a forwarded TCP connection: each chunk read on one side leaves for the other
side at its arrival time plus a fixed delay, in arrival order.

A delay line, not a sleep in the pump: chunks in flight overlap, so the delay adds latency without
limiting bandwidth (a 1 ms line still carries a chunk every few microseconds). One timer is armed at
a time, for the oldest chunk; chunks whose time has come leave together. A line can be held (a
network partition): nothing leaves until it is released, and then everything due leaves in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["EOF", "DelayLine"]

#: Marks the end of the stream in the line: the sink is half-closed when it leaves.
EOF = b""


class DelayLine:
    """Chunks from one transport to ``sink`` (set once it is connected), ``delay`` seconds late."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, delay: float, on_end: Callable[[], None] | None = None
    ) -> None:
        self._loop = loop
        self._on_end = on_end
        self.delay = delay
        self.sink: asyncio.Transport | None = None
        self.held = False
        self._queue: deque[tuple[float, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes) -> None:
        """Queue ``data`` (``EOF`` for the end of the stream) to leave ``delay`` seconds from now;
        ``on_end`` is called when the end leaves."""
        if not self._queue and self.delay <= 0 and not self.held and self.sink is not None:
            self._send(data)  # the common case at no delay: straight through, no timer
            return
        self._queue.append((self._loop.time() + self.delay, data))
        if len(self._queue) == 1:
            self._arm()

    def hold(self) -> None:
        self.held = True
        self._cancel()

    def release(self) -> None:
        self.held = False
        self.flush()

    def attach(self, sink: asyncio.Transport) -> None:
        """The other side is connected: what waited for it may leave."""
        self.sink = sink
        self.flush()

    def flush(self) -> None:
        """Send every chunk that is due, in order, and arm the timer for the next one."""
        self._cancel()
        if self.held or self.sink is None:
            return
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            self._send(self._queue.popleft()[1])
        self._arm()

    def pending(self) -> int:
        """Chunks in the line (sent by one side, not yet delivered to the other)."""
        return len(self._queue)

    def _arm(self) -> None:
        if self._queue and self._timer is None and not self.held and self.sink is not None:
            self._timer = self._loop.call_at(self._queue[0][0], self.flush)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _send(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and not sink.is_closing():
            if data:
                sink.write(data)
            elif sink.can_write_eof():
                sink.write_eof()
            else:
                sink.close()
        if not data and self._on_end is not None:
            self._on_end()

    def close(self) -> None:
        self._cancel()
        self._queue.clear()
