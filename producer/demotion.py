"""Connections that let go of a master that became a replica.

After a failover behind one stable address (a managed service's DNS name, a proxy), connections
made before it still reach the old master, now a replica: a write answers ``READONLY`` and a
blocked command ``-UNBLOCKED``, while ``PING`` still answers. redis-py keeps such a connection
(a ``ReadOnlyError`` is a reply like any other), so a client would keep asking the old server
forever. These connections disconnect on either reply and raise ``ConnectionError`` instead: the
caller's usual handling of a lost connection (the clients' retries within
``ITRAIN_PUBLISH_TIMEOUT``, redis-py's retry, the worker's reconnect) then connects again, to
whatever server the address now leads to. redis-py's sentinel-managed connections do the same
(and ask the sentinels again): these are for plain ``redis://`` and ``rediss://`` URLs.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

__all__ = [
    "AsyncDemotionAwareConnection",
    "AsyncDemotionAwareSSLConnection",
    "DemotionAwareConnection",
    "DemotionAwareSSLConnection",
    "demoted",
    "demotion_error",
]

#: The reply a demoted master gives a client blocked in BLMOVE, BRPOP... (then it disconnects it).
UNBLOCKED = "UNBLOCKED force unblock from blocking operation, instance state changed"


def demoted(exc: BaseException) -> bool:
    """Whether ``exc`` is a reply that only a master turned replica gives."""
    return isinstance(exc, redis.exceptions.ReadOnlyError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(UNBLOCKED)
    )


def demotion_error(exc: BaseException) -> redis.ConnectionError:
    return redis.ConnectionError(f"the server is no longer the master ({exc}); reconnecting")


class DemotionAwareConnection(redis.Connection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not demoted(exc):
                raise
            self.disconnect()  # type: ignore[no-untyped-call]
            raise demotion_error(exc) from exc


class DemotionAwareSSLConnection(redis.SSLConnection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not demoted(exc):
                raise
            self.disconnect()  # type: ignore[no-untyped-call]
            raise demotion_error(exc) from exc


class AsyncDemotionAwareConnection(aioredis.Connection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not demoted(exc):
                raise
            await self.disconnect()
            raise demotion_error(exc) from exc


class AsyncDemotionAwareSSLConnection(aioredis.SSLConnection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not demoted(exc):
                raise
            await self.disconnect()
            raise demotion_error(exc) from exc
