"""When a woken worker takes its messages: at once, or after a short window while they come fast.

Every pool job and every fetch has a cost of its own (a fetch round trip, a pool hand-off, a
lock, a checkpoint read, a commit, a results write), paid whether it carries one event or fifty.
At moderate rates, ``train_step`` events arrive one at a time, a few milliseconds apart: a worker
that fetched each as it arrived paid those costs once or twice per event (measured: ~840 µs of
worker CPU an event at 1,000 events/s, against ~25 at saturation).

So a worker woken by a message first asks how fast messages have been coming. While the window
(``ITRAIN_BATCH_WAIT_MS``) would gather at least ``GATHER`` of them, it waits the window out and
takes everything that arrived in one fetch, which becomes one pool job; otherwise waiting would
buy nothing and it fetches at once. The rate is a decaying count of the messages this worker
took (``HORIZON`` seconds of memory), so a burst turns the window on within a few fetches and a
quiet spell turns it off. A queue deep enough for full fetches never waits: the transport fetches
again without waiting on it. A message waits at most the window, as it did when the worker held
it for the window after taking it (``ITRAIN_BATCH_WAIT_ADAPTIVE=0``, the former rule); a lone
message at a low rate no longer waits at all.

Pure arithmetic on the caller's clock: the transport owns the timer and the fetch.
"""

from __future__ import annotations

import math

__all__ = ["GATHER", "HORIZON", "FetchWindow"]

#: A window is worth waiting only if it would gather at least this many messages.
GATHER = 2.0
#: Seconds over which the arrival rate is remembered (an exponential decay).
HORIZON = 0.25


class FetchWindow:
    """The rate at which a worker takes messages, and the wait it implies before a fetch."""

    __slots__ = ("_at", "_fast_until", "_mass", "_shared", "_shared_until", "gather", "horizon", "longest")

    def __init__(self, longest: float, *, gather: float = GATHER, horizon: float = HORIZON) -> None:
        if longest < 0 or gather <= 0 or horizon <= 0:
            raise ValueError(
                f"a fetch window needs longest >= 0, gather > 0, horizon > 0: {longest}, {gather}, {horizon}"
            )
        #: The longest wait, seconds (0: never wait).
        self.longest = longest
        self.gather = gather
        self.horizon = horizon
        #: Messages taken, each weighted by exp(-age / horizon), as of ``_at``.
        self._mass = 0.0
        self._at = 0.0
        #: Until then the stream counts as fast whatever this worker took (``others_gather``).
        self._fast_until = 0.0
        #: The rate at which all the queue's takers took messages, as last told (``shared``), and
        #: until when it holds.
        self._shared = 0.0
        self._shared_until = 0.0

    def _decayed(self, now: float) -> float:
        if now <= self._at:
            return self._mass
        return self._mass * math.exp((self._at - now) / self.horizon)

    def taken(self, count: int, now: float) -> None:
        """Record that a fetch at ``now`` took ``count`` messages."""
        self._mass = self._decayed(now) + count
        self._at = max(now, self._at)

    def others_gather(self, now: float) -> None:
        """Another worker of the queue is gathering its messages: the stream is fast, whatever
        this worker took (while they take turns, each takes only part of it), for ``horizon``."""
        self._fast_until = now + self.horizon

    def shared(self, rate: float, now: float) -> None:
        """All the takers of the queue together took ``rate`` messages a second lately (told at
        ``now``, held for ``horizon``): while several take turns, each takes only part of the
        stream, and the window follows the whole (``pool_fetch``, ``lua/tally.lua``)."""
        self._shared = rate
        self._shared_until = now + self.horizon

    def rate(self, now: float) -> float:
        """Messages a second, as remembered at ``now`` (or as told, when the queue's takers
        together took more)."""
        own = self._decayed(now) / self.horizon
        return max(own, self._shared) if now < self._shared_until else own

    def delay(self, now: float) -> float:
        """Seconds to wait before fetching after a wake-up at ``now``: the window while it would
        gather ``gather`` messages at the remembered rate (or another worker gathers), else 0."""
        if self.longest <= 0:
            return 0.0
        fast = now < self._fast_until or self.rate(now) * self.longest >= self.gather
        return self.longest if fast else 0.0
