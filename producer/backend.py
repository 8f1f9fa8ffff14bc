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
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

from producer.redis_conn import redact_url
from producer.sentinel import is_sentinel_url, master_client

__all__ = ["ProducerRedisBackend", "ProducerSentinelBackend", "SentinelResultBackend", "backend_url"]


class ProducerRedisBackend(RedisBackend):  # type: ignore[misc]
    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


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


class ProducerSentinelBackend(SentinelResultBackend):
    """The producer's Sentinel backend: no subscription on send (see the module's docstring)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def backend_url(url: str, *, producer: bool = True) -> str:
    """The ``result_backend`` setting that selects our class for ``url``: the producer's for a
    Redis URL (redis:// or rediss://); for a sentinel URL, the producer's or (``producer=False``)
    the worker's."""
    if is_sentinel_url(url):
        name = "ProducerSentinelBackend" if producer else "SentinelResultBackend"
        return f"{__name__}:{name}+{url}"
    return f"{__name__}:ProducerRedisBackend+{url}" if producer else url
