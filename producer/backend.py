"""The producer's result backend: Celery's Redis backend, minus the subscription on every send.

Celery's Redis backend subscribes to a task's result channel as soon as the task is sent, in case
someone waits on it. A producer that fires and forgets pays a round trip per event for nothing,
and with Redis down the subscription retries long after the publish itself would have failed.
Here the subscription happens when ``get()`` is called; ``get()`` also reads the stored result
first, so a result written before it subscribed is not missed.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

__all__ = ["ProducerRedisBackend", "backend_url"]


class ProducerRedisBackend(RedisBackend):  # type: ignore[misc]
    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def backend_url(url: str) -> str:
    """The ``result_backend`` setting that selects this class for ``url`` (redis:// or rediss://)."""
    return f"{__name__}:ProducerRedisBackend+{url}"
