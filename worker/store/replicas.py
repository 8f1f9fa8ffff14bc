"""A worker's wait for replicas before it acknowledges messages (``ITRAIN_MIN_REPLICAS``).

A failover could lose a commit or a result whose message the broker already counts as
acknowledged: the event would be gone for good. So, with ``ITRAIN_MIN_REPLICAS`` set, the worker
waits for the replicas of the Redis it wrote to before it acks, and a shortfall is a Redis fault
(``ReplicationError``, ``worker.consume.faults``): the messages go back to the queue, and the
event markers make the redelivery a ``duplicate`` where the commit survived.

That holds when the store is the broker's own Redis too. Each connection follows the master by
itself (``producer.sentinel``, ``producer.demotion``), so in a failover they part: a pool
process's commit sent to a master just before it stalled (``SIGSTOP``, a slow host) lands when it
resumes, still a master for a moment, while the main process's broker connection has moved to the
promoted replica; the ack then removes the new master's record of a message whose commit the
demotion wipes (``tests/reliability/test_failover.py``'s sigstop scenario, where this left events
untrained and their handles pending).

``WAIT`` counts the replicas that hold its own connection's writes, up to its last one, and an
answer may rest on writes of other connections (a commit whose earlier wait fell short, found
again as markers by the redelivery; a result that stands). So the wait follows a ``PUBLISH`` of
its own on the same connection: it is replicated (pub/sub reaches clients of replicas), stores
nothing, and comes after all of them in the replication stream. (Redis 7.0 counts a new
connection from the offset at which it connected, Valkey 8 from zero: neither is a barrier
without a write.) The commit and the results queue the barrier in their own pipeline
(``queue``), so it runs on the connection that wrote them: a wait sent apart could go out on a
new connection to another server, which says nothing of the writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.client import Pipeline

from producer.replicas import ReplicaWait
from producer.settings import Settings

__all__ = ["BARRIER_CHANNEL", "ReplicaBarrier"]

#: The channel of the barrier's ``PUBLISH`` (nobody listens; the worker's ACL allows it).
BARRIER_CHANNEL = "itrain:replicated"


class ReplicaBarrier:
    """Waits for the replicas of one Redis of the worker's to hold every write made there so far."""

    def __init__(self, client: redis.Redis, wait: ReplicaWait) -> None:
        self.client = client
        self.wait = wait

    @classmethod
    def of(cls, client: redis.Redis, settings: Settings, url: str) -> ReplicaBarrier | None:
        """The barrier for ``url`` (the store's or the backend's), or None: no replicas wanted."""
        wait = ReplicaWait.of(settings, url)
        return None if wait is None else cls(client, wait)

    def queue(self, pipe: Pipeline) -> None:
        """Queue the barrier behind the writes ``pipe`` holds: two replies, for ``check``."""
        pipe.publish(BARRIER_CHANNEL, "1")
        pipe.execute_command(*self.wait.command)  # type: ignore[no-untyped-call]

    def check(self, replies: Sequence[Any], event_ids: Sequence[str], what: str) -> None:
        """``ReplicationError`` (a Redis fault) when the queued barrier's ``replies`` say too few
        replicas acknowledged in time; a reply that is an error is raised."""
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        self.wait.check(int(replies[-1]), event_ids, what)

    def cross(self, event_ids: Sequence[str], what: str) -> None:
        """Return once the replicas hold every write made so far; ``ReplicationError`` (a Redis
        fault) when too few acknowledge in time."""
        pipe = self.client.pipeline(transaction=False)
        self.queue(pipe)
        self.check(pipe.execute(raise_on_error=False), event_ids, what)
