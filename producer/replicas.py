"""Waiting for replicas (``ITRAIN_MIN_REPLICAS``): the ``WAIT`` command and what a shortfall means.

Replication is asynchronous: a master acknowledges a push before any replica holds it, and a
failover in that window loses the push for good. ``WAIT n timeout`` answers how many replicas
hold the writes of *the connection it is sent on*, up to that connection's last write. So the
clients send it pipelined behind the ``LPUSH`` on the very connection that pushed (one ``WAIT``
per call, whatever the number of chunks: they all go in one ``LPUSH``), and raise
``ReplicationError`` when fewer than ``ITRAIN_MIN_REPLICAS`` answer within
``ITRAIN_REPLICA_TIMEOUT_MS``. With 0 (the default) no ``WAIT`` is sent at all.

A worker whose store or result backend is another Redis than the broker's waits for that Redis's
replicas before it acknowledges the messages (``worker.store.replicas``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from producer.errors import ItrainError, PermissionDeniedError, ReplicationError
from producer.redis_conn import redact_url
from producer.settings import Settings

__all__ = ["ReplicaWait"]


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """``WAIT replicas timeout_ms`` on the Redis at ``url`` (shown redacted in errors)."""

    replicas: int
    timeout_ms: int
    url: str

    @classmethod
    def of(cls, settings: Settings, url: str) -> ReplicaWait | None:
        """The wait ``settings`` ask for on ``url``; None when nothing waits."""
        if not settings.min_replicas:
            return None
        return cls(settings.min_replicas, settings.replica_timeout_ms, url)

    @property
    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def check(self, acked: int, event_ids: Sequence[str], what: str = "push") -> None:
        """``ReplicationError`` when ``acked`` (``WAIT``'s reply) is short of the replicas wanted."""
        if acked >= self.replicas:
            return
        raise ReplicationError(
            f"{acked} of the {self.replicas} replica(s) of {redact_url(self.url)} wanted "
            f"(ITRAIN_MIN_REPLICAS) acknowledged the {what} of {len(event_ids)} event(s) within "
            f"ITRAIN_REPLICA_TIMEOUT_MS={self.timeout_ms}; they are on the master only: a failover "
            "now could lose them (sending them again is safe: their event ids de-duplicate)",
            wanted=self.replicas,
            got=acked,
            event_ids=event_ids,
        )

    def refused(self, exc: redis.ResponseError, event_ids: Sequence[str]) -> ItrainError:
        """The error for a ``WAIT`` Redis refused after the push it follows landed: a user without
        the right (``NOPERM``) is ``PermissionDeniedError``, anything else ``ReplicationError``;
        either says that the events were enqueued."""
        where = redact_url(self.url)
        if isinstance(exc, redis.exceptions.NoPermissionError):
            return PermissionDeniedError(
                f"the Redis user of {where} lacks a permission: {exc}; the {len(event_ids)} event(s) "
                "were enqueued, but their replicas cannot be waited for (`itrain acl --role producer` "
                "prints what a producer needs)"
            )
        return ReplicationError(
            f"{where} refused WAIT ({exc}) after enqueueing {len(event_ids)} event(s): their replicas "
            "are unknown (sending them again is safe: their event ids de-duplicate)",
            wanted=self.replicas,
            got=0,
            event_ids=event_ids,
        )
