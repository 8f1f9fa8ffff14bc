"""Flower's broker pages on every sentinel of a ``;``-joined sentinel URL.

Flower (2.2) reads the broker's queues through a client of its own: for a ``sentinel://`` URL, an
asyncio ``redis.asyncio.sentinel.Sentinel`` on the one address it parses from the URL (the first part), with
``broker_transport_options["sentinel_kwargs"]`` as each sentinel client's arguments. With that
sentinel down, its ``/broker`` and ``/api/queues/length`` pages failed while every other sentinel
answered. redis-py builds each sentinel client as ``Redis(host, port, **sentinel_kwargs)``, and a
``connection_pool`` among those arguments replaces the address: the worker app gives Flower one
whose connections go to the first sentinel of the URL that accepts them, in the URL's order.

Our own transport asks every sentinel itself and takes the pool out again
(``worker.consume.sentinel_transport``); no Flower code is patched.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from producer.sentinel import SentinelURL

__all__ = ["FLOWER_POOL", "AnySentinelConnection", "AnySentinelSSLConnection", "any_sentinel_pool"]

#: The key, in ``sentinel_kwargs``, of the pool that only Flower uses.
FLOWER_POOL = "connection_pool"


class _FirstAnswering:
    """Mixed in before a ``redis.asyncio`` connection class: connects to the first of
    ``sentinels`` that accepts the connection (each within its ``socket_connect_timeout``)."""

    def __init__(self, *args: Any, sentinels: tuple[tuple[str, int], ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sentinels = sentinels

    async def _connect(self) -> Any:
        failed: OSError | None = None
        for host, port in self.sentinels:
            self.host, self.port = host, port  # redis-py's own attributes: where _connect goes
            try:
                return await super()._connect()  # type: ignore[misc]
            except OSError as exc:  # refused, unreachable, timed out, a TLS handshake that failed
                failed = exc
        raise failed or OSError("the sentinel URL names no sentinel")


class AnySentinelConnection(_FirstAnswering, aioredis.Connection):
    pass


class AnySentinelSSLConnection(_FirstAnswering, aioredis.SSLConnection):
    pass


def any_sentinel_pool(parsed: SentinelURL, sentinel_kwargs: dict[str, Any]) -> aioredis.ConnectionPool:
    """A pool of connections to whichever sentinel of ``parsed`` answers, with the sentinels'
    login, TLS and timeouts (``sentinel_kwargs``, as ``SentinelURL.sentinel_kwargs`` makes them)."""
    kwargs = dict(sentinel_kwargs)
    tls = bool(kwargs.pop("ssl", False))
    first_host, first_port = parsed.sentinels[0]
    return aioredis.ConnectionPool(
        connection_class=AnySentinelSSLConnection if tls else AnySentinelConnection,
        host=first_host,
        port=first_port,
        sentinels=parsed.sentinels,
        **kwargs,
    )
