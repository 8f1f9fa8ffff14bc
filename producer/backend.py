"""The result backends: Celery's Redis backend, minus the subscription on every send, and Celery's
Sentinel backend on our sentinel URLs.

Celery's Redis backend subscribes to a task's result channel as soon as the task is sent, in case
someone waits on it. A producer that fires and forgets pays a round trip per event for nothing,
and with Redis down the subscription retries long after the publish itself would have failed.
Here the subscription happens when ``get()`` is called; ``get()`` also reads the stored result
first, so a result written before it subscribed is not missed.

Celery's ``SentinelBackend`` reads the master's login and database from the first sentinel only,
takes no TLS options from the URL and leaves the sentinels' sockets without a timeout (a hung
sentinel holds a caller for ever). ``SentinelResultBackend`` makes its connections as every other
component does (``producer.sentinel``): every sentinel asked, each within its share of
``ITRAIN_PUBLISH_TIMEOUT``, TLS on the master and the sentinels, and after a failover the
next command goes to the new master.

A ``get()`` subscribed to its result's channel on a master that is then demoted behind the same
address hears nothing more unless the demoted server still replicates from the promoted one (a
replica relays its master's ``PUBLISH``): one cut off from it, or retired, would hold the caller
until its timeout. While it waits, the producer's result consumer asks, at most once a second,
whether the server of its subscription still takes writes (``WAIT 0 0``, which a replica refuses
and a master answers at once; the producer's ACL role has it), and moves the subscription when
not: Celery's own reconnect reads every awaited result, then subscribes again, on the server the
address now leads to.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import redis
from celery.backends.redis import RedisBackend, ResultConsumer, SentinelBackend

from producer.demotion import DEMOTIONS, DemotionAwareConnection, DemotionAwareSSLConnection, stale
from producer.redis_conn import redact_url
from producer.sentinel import is_sentinel_url, master_client

__all__ = ["ProducerRedisBackend", "ProducerSentinelBackend", "SentinelResultBackend", "backend_url"]


#: The most often, in seconds, a waiting ``get()`` asks whether its subscription's server is
#: still the master: a round trip a second while a caller waits, a demotion noticed within it.
RECHECK_SECONDS = 1.0


def _refused_by_replica(exc: redis.ResponseError) -> bool:
    # "WAIT cannot be used with replica instances..."
    return str(exc).startswith("WAIT cannot be used with replica")


class _ResultConsumer(ResultConsumer):  # type: ignore[misc]
    """Celery's Redis result consumer whose subscription follows a demotion (see the module)."""

    _next_check = 0.0

    def drain_events(self, timeout: float | None = None) -> Any:
        if self.subscribed_to and monotonic() >= self._next_check:
            self._next_check = monotonic() + RECHECK_SECONDS
            if self._on_demoted_server():
                # Celery's reconnect (private, as of Celery 5.7): a fresh pool, every awaited
                # result read, the channels subscribed again.
                self._reconnect_pubsub()
        return super().drain_events(timeout)

    def _on_demoted_server(self) -> bool:
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None and stale(connection):
            return True  # another connection of this process was told of a demotion since
        try:
            self.backend.client.execute_command("WAIT", 0, 0)
        except redis.ResponseError as exc:
            if not _refused_by_replica(exc):
                return False
            DEMOTIONS.seen()
            return True
        except redis.ConnectionError:
            return False  # Celery's own reconnect handles a lost connection
        return False


_DEMOTION_AWARE: dict[type[Any], type[Any]] = {
    redis.Connection: DemotionAwareConnection,
    redis.SSLConnection: DemotionAwareSSLConnection,
}


class _ProducerSide:
    """What the producer's backends add to Celery's: no subscription on send (see the module's
    docstring), a result consumer that follows a demotion, and demotion-aware connections."""

    ResultConsumer = _ResultConsumer

    def _get_pool(self, **params: Any) -> Any:
        # Demotion-aware connections (producer.demotion): a subscription made before another
        # connection of this process was told of a demotion is moved at the next check.
        base = params.get("connection_class") or redis.Connection
        if base in _DEMOTION_AWARE:  # a unix socket keeps its own class
            params["connection_class"] = _DEMOTION_AWARE[base]
        return super()._get_pool(**params)  # type: ignore[misc]

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class ProducerRedisBackend(_ProducerSide, RedisBackend):  # type: ignore[misc]
    """The producer's backend on a ``redis://`` or ``rediss://`` URL."""


class SentinelResultBackend(SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel backend on a sentinel URL that names its master (the settings' form)."""

    #: Seconds a sentinel or the master may take, when Celery's ``redis_socket_timeout`` is unset.
    default_timeout = 5.0

    def _params_from_url(self, url: str, defaults: dict[str, Any]) -> dict[str, Any]:
        # The connections are made from the whole URL in ``_get_pool``; Celery's own reading of
        # it (the first part's login and database only) is not used.
        return dict(defaults)

    def _get_pool(self, **params: Any) -> Any:
        timeout = params.get("socket_timeout") or self.default_timeout
        return master_client(self.url, float(timeout)).connection_pool

    def as_uri(self, include_password: bool = False) -> str:
        return str(self.url) if include_password else redact_url(self.url or "")


class ProducerSentinelBackend(_ProducerSide, SentinelResultBackend):
    """The producer's Sentinel backend (its master's pool is made by ``master_client``, which
    picks the connection class itself)."""


def backend_url(url: str, *, producer: bool = True) -> str:
    """The ``result_backend`` setting that selects our class for ``url``: the producer's for a
    Redis URL (redis:// or rediss://); for a sentinel URL, the producer's or (``producer=False``)
    the worker's."""
    if is_sentinel_url(url):
        name = "ProducerSentinelBackend" if producer else "SentinelResultBackend"
        return f"{__name__}:{name}+{url}"
    return f"{__name__}:ProducerRedisBackend+{url}" if producer else url
