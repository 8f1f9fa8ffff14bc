"""Our transport (``worker.consume.transport``) on a Redis under Sentinel.

The worker's broker URL ``sentinel://h1:p1;sentinel://h2:p2/db`` becomes
``itrainsentinel://h1:p1;itrainsentinel://h2:p2/db``: a scheme of our own, registered in kombu's
transport aliases (as ``itrain://`` is), so that a failover ``Connection.switch()`` to another part
of the URL keeps this transport instead of falling back to kombu's stock one.

The channel is ours (atomic multi-fetch, batched acks) on kombu's ``SentinelChannel``: its
connections are redis-py's sentinel-managed ones, which ask the sentinels for the master when
they connect and turn a demoted master's ``READONLY`` (and ``-UNBLOCKED``) into a connection
error, so that the consumer reconnects to the new master. kombu keeps only the parts of the URL
whose scheme is ``sentinel``: with ours it would silently ask the first sentinel only, and a
worker would not find the master while that one sentinel is down. ``_sentinel_managed_pool``
here takes every part.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.sentinel
from celery.app.amqp import AMQP
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.utils.url import _parse_url

from producer.demotion import WriteAwareSentinelConnection, WriteAwareSentinelSSLConnection
from producer.sentinel import SCHEME as SENTINEL
from producer.sentinel import CheckedPool
from producer.sentinel_discovery import FailoverAwareSentinel
from worker.consume import transport
from worker.consume.flower_sentinels import FLOWER_POOL
from worker.consume.transport import Channel, Transport

__all__ = ["AMQP_CLASS", "SCHEME", "SentinelChannel", "SentinelTransport", "as_redis_url", "transport_url"]

#: The URL scheme of this transport; it stands for ``sentinel``.
SCHEME = "itrainsentinel"
TRANSPORT_ALIASES[SCHEME] = f"{__name__}:SentinelTransport"


def transport_url(url: str) -> str:
    """The worker's broker URL for a Redis or sentinel URL (``sentinel://`` -> ``itrainsentinel://``
    in every part; the rest as ``worker.consume.transport.transport_url``)."""
    if url.startswith(SENTINEL + "://"):
        return ";".join(SCHEME + part[len(SENTINEL) :] for part in url.split(";"))
    return transport.transport_url(url)


def as_redis_url(url: str) -> str:
    """The inverse of ``transport_url``: what Flower's broker pages and humans are shown."""
    if url.startswith(SCHEME + "://"):
        return ";".join(SENTINEL + part[len(SCHEME) :] for part in url.split(";"))
    return transport.as_redis_url(url)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    # Sentinel-managed connections (before ours in the method order they would not be) that also
    # drop a master refusing writes (NOREPLICAS), so the worker reconnects through the sentinels
    # instead of retrying on an isolated master (producer.demotion).
    connection_class = WriteAwareSentinelConnection  # type: ignore[assignment]
    connection_class_ssl = WriteAwareSentinelSSLConnection  # type: ignore[assignment]
    # Ours comes first in the method order: without kombu's Sentinel options here, ``master_name``
    # would be dropped from the transport options.
    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        "master_name",
        "min_other_sentinels",
        "sentinel_kwargs",
    )

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        """kombu's, with every part of the URL a sentinel (kombu's keeps ``sentinel://`` parts
        only, and falls back to the first address)."""
        connparams = self._connparams(asynchronous)
        params = {k: v for k, v in connparams.items() if k not in ("host", "port")}
        sentinels: list[tuple[str, int]] = []
        for url in self.connection.client.alt:
            parts = _parse_url(url)
            if parts.scheme in (SCHEME, SENTINEL):
                sentinels.append((parts.hostname, parts.port or self.connection.default_port))
        if not sentinels:
            sentinels.append((connparams["host"], connparams["port"]))
        # Without the pool that the worker app gives Flower (worker.consume.flower_sentinels):
        # each sentinel here is asked on its own.
        sentinel_kwargs = dict(getattr(self, "sentinel_kwargs", None) or {})
        sentinel_kwargs.pop(FLOWER_POOL, None)
        # A sentinel in the middle of a failover still names the demoted master: passed over
        # while another names the new one (producer.sentinel_discovery).
        manager = FailoverAwareSentinel(
            sentinels,
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=sentinel_kwargs,
            **params,
        )
        # Kept so that kombu's ``_disconnect_pools`` closes the sentinels' connections too.
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        master_name = getattr(self, "master_name", None)
        if master_name is None:
            raise ValueError("'master_name' transport option must be specified.")
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        client = manager.master_for(
            master_name, redis.Redis, connection_pool_class=CheckedPool, **credentials
        )
        return client.connection_pool


class SentinelTransport(Transport, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class _Connection(transport._Connection):
    """Shows Flower a URL it can read: ``sentinel://`` (Flower asks the first sentinel)."""

    def as_uri(self, *args: Any, **kwargs: Any) -> str:
        return as_redis_url(super().as_uri(*args, **kwargs))


class _AMQP(AMQP):  # type: ignore[misc]
    Connection = _Connection


#: The worker app's ``amqp`` class (``Celery(amqp=...)``), for every broker URL.
AMQP_CLASS = f"{__name__}:_AMQP"
