"""Redis memory per sustained event/s: what a steady stream of events keeps in Redis.

Every key an event leaves behind expires (results after ``ITRAIN_RESULT_EXPIRES``, de-dup
markers a window and up to two slots after their slot), so under a steady stream of R events/s
Redis holds about R x (bytes x seconds kept, per event). Measured here on a real server: the sum
over the expiring keys a run created of ``MEMORY USAGE`` x remaining TTL, divided by the events
the run trained. The result, in bytes per sustained event/s, times the rate, is the steady-state
memory those keys take (1,000 events/s x 1.07 MB = 1 GiB).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

__all__ = ["MemoryFigure", "expiring_keys", "memory_figure"]


@dataclass
class MemoryFigure:
    """Bytes per sustained event/s, by kind of key, for one workload."""

    workload: str
    events: int
    #: kind -> bytes per sustained event/s (MEMORY USAGE x TTL / events).
    bytes_per_event_per_s: dict[str, float] = field(default_factory=dict)
    #: kind -> mean MEMORY USAGE per event, bytes (what one event's share of the keys weighs).
    bytes_per_event: dict[str, float] = field(default_factory=dict)

    @property
    def total_mb(self) -> float:
        return sum(self.bytes_per_event_per_s.values()) / 1e6


def _kind(key: bytes) -> str:
    if key.startswith(b"celery-task-meta-"):
        return "results"
    if b":done:" in key:
        return "markers"
    return "other"


def expiring_keys(client: redis.Redis) -> set[bytes]:
    """The names of every key that has a TTL."""
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    return {key for key, ttl in zip(keys, pipe.execute(), strict=True) if ttl > 0}


def memory_figure(client: redis.Redis, workload: str, events: int, before: Iterable[bytes]) -> MemoryFigure:
    """The figure for the expiring keys that exist now and did not before the run."""
    old = set(before)
    keys = [k for k in expiring_keys(client) if k not in old]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)  # every element counted, not a sample
        pipe.ttl(key)
    replies = pipe.execute()
    weighted: dict[str, float] = {}
    size: dict[str, float] = {}
    for key, usage, ttl in zip(keys, replies[0::2], replies[1::2], strict=True):
        if usage is None or ttl <= 0:
            continue
        kind = _kind(key)
        weighted[kind] = weighted.get(kind, 0.0) + usage * ttl
        size[kind] = size.get(kind, 0.0) + usage
    n = max(events, 1)
    return MemoryFigure(
        workload,
        events,
        {kind: round(v / n, 1) for kind, v in weighted.items()},
        {kind: round(v / n, 1) for kind, v in size.items()},
    )
