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

One connection's demotion reply speaks for the server: every other connection of the process made
before it is dropped at its next command too (``DEMOTIONS``). Those that only ever send what a
replica still accepts would otherwise stay on the demoted server for good: a ``PUBLISH`` there (a
control broadcast, a task event) reaches only that server's subscribers, while the workers listen
on the promoted one. A command refused because its server was demoted did nothing there, so it is
sent once more, on a new connection, before the caller sees an error (``redis-py``'s retry, given
one retry for ``ServerDemotedError`` where it had none).
"""

from __future__ import annotations

import threading
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.packing import FastPacking

__all__ = [
    "AsyncDemotionAwareConnection",
    "AsyncDemotionAwareSSLConnection",
    "DemotionAwareConnection",
    "DemotionAwareSSLConnection",
    "WriteAwareSentinelConnection",
    "WriteAwareSentinelSSLConnection",
    "AsyncWriteAwareSentinelConnection",
    "AsyncWriteAwareSentinelSSLConnection",
    "DEMOTIONS",
    "ServerDemotedError",
    "demoted",
    "demotion_error",
    "refuses_writes",
    "stale",
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


class ServerDemotedError(redis.ConnectionError):
    """A connection's server is no longer the master (it said so, or another connection of this
    process was told so since this one connected): dropped; the next command reconnects."""


def demotion_error(exc: BaseException) -> redis.ConnectionError:
    if demoted(exc):
        return ServerDemotedError(f"the server is no longer the master ({exc}); reconnecting")
    return redis.ConnectionError(f"the server cannot take writes now ({exc}); reconnecting")


class _Demotions:
    """How many demotions this process has been told of: a connection made before the latest one
    may still reach the demoted server. Process-wide rather than per address: the same server
    answers at several addresses (a forwarder, a DNS name, its own), and a demotion is rare
    enough that dropping every older connection once costs nothing that matters."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def seen(self) -> None:
        with self._lock:
            self.count += 1


DEMOTIONS = _Demotions()


def stale(connection: Any) -> bool:
    """Whether ``connection`` was made before the latest demotion this process was told of."""
    return int(getattr(connection, "_demotions_at_connect", DEMOTIONS.count)) < DEMOTIONS.count


def _one_retry_on_demotion(retry: Any, kind: type[Any]) -> Any:
    """``retry``, or where it retries nothing, one retry of a command refused by a demoted
    server (a command that did nothing there; its retry reconnects)."""
    if retry.get_retries() > 0:
        return retry
    return kind(NoBackoff(), 1, supported_errors=(ServerDemotedError,))


class _DropOnDemotion:
    """Mixed in before a redis-py connection class: a reply saying the server cannot take writes
    now drops the connection and raises ``demotion_error``, so the next command reconnects
    (through the sentinels, where the pool has them); a demotion also drops, at their next
    command, the connections of this process made before it (``DEMOTIONS``)."""

    _demotions_at_connect = 0
    retry: Any  # redis-py's

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry = _one_retry_on_demotion(self.retry, Retry)

    def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        # Stamped before the handshake (HELLO, AUTH... are sent through send_packed_command); a
        # call on a connection already open (the pool's, on every checkout) changes nothing.
        if self._sock is None:  # type: ignore[attr-defined]
            self._demotions_at_connect = DEMOTIONS.count
        return super().connect_check_health(*args, **kwargs)  # type: ignore[misc]

    def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._sock is not None and stale(self):  # type: ignore[attr-defined]
            self.disconnect()  # type: ignore[attr-defined]
            raise ServerDemotedError("a master was demoted since this connection was made; reconnecting")
        return super().send_packed_command(*args, **kwargs)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not refuses_writes(exc):
                raise
            if demoted(exc):
                DEMOTIONS.seen()
            self.disconnect()  # type: ignore[attr-defined]
            raise demotion_error(exc) from exc


class _AsyncDropOnDemotion:
    """``_DropOnDemotion`` for ``redis.asyncio`` connections."""

    _demotions_at_connect = 0
    retry: Any  # redis-py's

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry = _one_retry_on_demotion(self.retry, AsyncRetry)

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        if not self.is_connected:  # type: ignore[attr-defined]
            self._demotions_at_connect = DEMOTIONS.count
        return await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_connected and stale(self):  # type: ignore[attr-defined]
            await self.disconnect()  # type: ignore[attr-defined]
            raise ServerDemotedError("a master was demoted since this connection was made; reconnecting")
        return await super().send_packed_command(*args, **kwargs)  # type: ignore[misc]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not refuses_writes(exc):
                raise
            if demoted(exc):
                DEMOTIONS.seen()
            await self.disconnect()  # type: ignore[attr-defined]
            raise demotion_error(exc) from exc


class DemotionAwareConnection(_DropOnDemotion, FastPacking, redis.Connection):
    pass


class DemotionAwareSSLConnection(_DropOnDemotion, FastPacking, redis.SSLConnection):
    pass


class AsyncDemotionAwareConnection(_AsyncDropOnDemotion, aioredis.Connection):
    pass


class AsyncDemotionAwareSSLConnection(_AsyncDropOnDemotion, aioredis.SSLConnection):
    pass


class WriteAwareSentinelConnection(_DropOnDemotion, FastPacking, redis.sentinel.SentinelManagedConnection):
    pass


class WriteAwareSentinelSSLConnection(
    _DropOnDemotion, FastPacking, redis.sentinel.SentinelManagedSSLConnection
):
    pass


class AsyncWriteAwareSentinelConnection(_AsyncDropOnDemotion, aiosentinel.SentinelManagedConnection):
    pass


class AsyncWriteAwareSentinelSSLConnection(_AsyncDropOnDemotion, aiosentinel.SentinelManagedSSLConnection):
    pass
