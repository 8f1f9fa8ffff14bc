"""Connections that let go of a master that became a replica.

After a failover behind one stable address (a managed service's DNS name, a proxy), connections
made before it still reach the old master, now a replica: a write answers ``READONLY`` and a
blocked command ``-UNBLOCKED``, while ``PING`` still answers. redis-py keeps such a connection
(a ``ReadOnlyError`` is a reply like any other), so a client would keep asking the old server
forever. These connections disconnect on either reply and raise ``ConnectionError`` instead: the
caller's usual handling of a lost connection (the clients' retries within
``ITRAIN_PUBLISH_TIMEOUT``, redis-py's retry, the worker's reconnect) then connects again, to
whatever server the address now leads to.

A master that refuses writes under ``min-replicas-to-write`` (``NOREPLICAS``: its replicas are
gone or lag beyond ``min-replicas-max-lag``, as when the master alone is cut off from the others)
is treated the same way: it cannot take writes now, and the master that can may be elsewhere (the
sentinels may have promoted a replica on the other side). redis-py's sentinel-managed connections
handle ``READONLY`` and ``-UNBLOCKED`` but let ``NOREPLICAS`` through as a reply, which would keep a
caller on the isolated master: the ``WriteAwareSentinel*`` connections add it (disconnected, their
next connect asks the sentinels again). ``DemotionAware*`` are for plain ``redis://`` and
``rediss://`` URLs.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel

__all__ = [
    "AsyncDemotionAwareConnection",
    "AsyncDemotionAwareSSLConnection",
    "DemotionAwareConnection",
    "DemotionAwareSSLConnection",
    "WriteAwareSentinelConnection",
    "WriteAwareSentinelSSLConnection",
    "AsyncWriteAwareSentinelConnection",
    "AsyncWriteAwareSentinelSSLConnection",
    "demoted",
    "demotion_error",
    "refuses_writes",
]

#: The reply a demoted master gives a client blocked in BLMOVE, BRPOP... (then it disconnects it).
UNBLOCKED = "UNBLOCKED force unblock from blocking operation, instance state changed"


def demoted(exc: BaseException) -> bool:
    """Whether ``exc`` is a reply that only a master turned replica gives."""
    return isinstance(exc, redis.exceptions.ReadOnlyError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(UNBLOCKED)
    )


#: The reply of a master that has fewer good replicas than its ``min-replicas-to-write``.
NOREPLICAS = "NOREPLICAS"


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` says this server cannot take writes now: demoted, or short of replicas."""
    return demoted(exc) or (isinstance(exc, redis.ResponseError) and str(exc).startswith(NOREPLICAS))


def demotion_error(exc: BaseException) -> redis.ConnectionError:
    if demoted(exc):
        return redis.ConnectionError(f"the server is no longer the master ({exc}); reconnecting")
    return redis.ConnectionError(f"the server cannot take writes now ({exc}); reconnecting")


class _DropOnDemotion:
    """Mixed in before a redis-py connection class: a reply saying the server cannot take writes
    now drops the connection and raises ``demotion_error``, so the next command reconnects
    (through the sentinels, where the pool has them)."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not refuses_writes(exc):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise demotion_error(exc) from exc


class _AsyncDropOnDemotion:
    """``_DropOnDemotion`` for ``redis.asyncio`` connections."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not refuses_writes(exc):
                raise
            await self.disconnect()  # type: ignore[attr-defined]
            raise demotion_error(exc) from exc


class DemotionAwareConnection(_DropOnDemotion, redis.Connection):
    pass


class DemotionAwareSSLConnection(_DropOnDemotion, redis.SSLConnection):
    pass


class AsyncDemotionAwareConnection(_AsyncDropOnDemotion, aioredis.Connection):
    pass


class AsyncDemotionAwareSSLConnection(_AsyncDropOnDemotion, aioredis.SSLConnection):
    pass


class WriteAwareSentinelConnection(_DropOnDemotion, redis.sentinel.SentinelManagedConnection):
    pass


class WriteAwareSentinelSSLConnection(_DropOnDemotion, redis.sentinel.SentinelManagedSSLConnection):
    pass


class AsyncWriteAwareSentinelConnection(_AsyncDropOnDemotion, aiosentinel.SentinelManagedConnection):
    pass


class AsyncWriteAwareSentinelSSLConnection(_AsyncDropOnDemotion, aiosentinel.SentinelManagedSSLConnection):
    pass
