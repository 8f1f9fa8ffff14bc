"""A worker's wait for replicas before it acknowledges messages (``ITRAIN_MIN_REPLICAS``).

When the store (``ITRAIN_STORE_URL``) or the result backend is another Redis than the broker, a
failover there could lose a commit or a result whose message the broker already counts as
acknowledged: the event would be gone for good. So before the acks the worker waits for that
Redis's replicas to hold what it wrote, and a shortfall is a Redis fault (``ReplicationError``,
``worker.consume.faults``): the messages go back to the queue, and the event markers make the
redelivery a ``duplicate`` where the commit survived.

When a Redis is the broker's own, nothing waits: the acks go to the same server after the
writes, and a promoted replica holds a prefix of the master's stream, so a failover that loses a
commit or a result loses its ack too and the message comes back.

``WAIT`` counts the replicas that hold its own connection's writes, up to its last one, and an
answer may rest on writes of other connections (a commit whose earlier wait fell short, found
again as markers by the redelivery; a result that stands). So the wait follows a ``PUBLISH`` of
its own on the same connection, in one pipeline: it is replicated (pub/sub reaches clients of
replicas), stores nothing, and comes after all of them in the replication stream. (Redis 7.0
counts a new connection from the offset at which it connected, Valkey 8 from zero: neither is a
barrier without a write.)
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from producer.replicas import ReplicaWait
from producer.settings import Settings

__all__ = ["BARRIER_CHANNEL", "ReplicaBarrier"]

#: The channel of the barrier's ``PUBLISH`` (nobody listens; the worker's ACL allows it).
BARRIER_CHANNEL = "itrain:replicated"


class ReplicaBarrier:
    """Waits for the replicas of one Redis of the worker's (not the broker's) to hold every write
    made there so far."""

    def __init__(self, client: redis.Redis, wait: ReplicaWait) -> None:
        self.client = client
        self.wait = wait

    @classmethod
    def of(cls, client: redis.Redis, settings: Settings, url: str) -> ReplicaBarrier | None:
        """The barrier for ``url`` (the store's or the backend's), or None: no replicas wanted,
        or ``url`` is the broker's."""
        wait = ReplicaWait.of(settings, url)
        if wait is None or url == settings.broker:
            return None
        return cls(client, wait)

    def cross(self, event_ids: Sequence[str], what: str) -> None:
        """Return once the replicas hold every write made so far; ``ReplicationError`` (a Redis
        fault) when too few acknowledge in time."""
        pipe = self.client.pipeline(transaction=False)
        pipe.publish(BARRIER_CHANNEL, "1")
        pipe.execute_command(*self.wait.command)  # type: ignore[no-untyped-call]
        _, acked = pipe.execute()
        self.wait.check(int(acked), event_ids, what)
