"""Giving a model a queue of its own, and checking that some worker consumes it.

The routes are the hash ``itrain:routes`` (model -> queue) in the broker's Redis, beside the
queues; the clients read it (``producer.routes``). ``itrain init --queue`` and ``itrain route``
write it here; a model routed back to ``ITRAIN_QUEUE`` loses its entry (absent means default).

Moving a model is safe while events flow: events already on the old queue, and events sent there
by producers whose copy of the routes is up to ``ITRAIN_ROUTES_TTL`` seconds old, still train
(a worker trains any model's event from any queue it consumes). The old queue drains as long as
some worker consumes it.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
from celery import Celery

from producer.keys import ROUTES
from producer.routes import check_queue_name

__all__ = ["consumed_queues", "drop_route", "read_routes", "set_route", "unserved"]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read_routes(broker: redis.Redis) -> dict[str, str]:
    """Every entry of ``itrain:routes`` as stored (an entry written by hand may name a queue no
    model can be routed to: the clients ignore it, ``itrain models`` shows it)."""
    return {_text(m): _text(q) for m, q in broker.hgetall(ROUTES).items()}


def set_route(broker: redis.Redis, model: str, queue: str, default: str) -> str:
    """Route ``model``'s events to ``queue`` (checked: ``QueueNameError``); returns the queue it
    had. Routing to ``default`` (``ITRAIN_QUEUE``) removes its entry."""
    check_queue_name(queue, default)
    pipe = broker.pipeline(transaction=True)
    pipe.hget(ROUTES, model)
    if queue == default:
        pipe.hdel(ROUTES, model)
    else:
        pipe.hset(ROUTES, model, queue)
    old, _ = pipe.execute()
    return default if old is None else _text(old)


def drop_route(broker: redis.Redis, model: str) -> None:
    """Forget ``model``'s route (``itrain delete``)."""
    broker.hdel(ROUTES, model)


def consumed_queues(app: Celery, timeout: float = 1.0) -> set[str]:
    """The queues the live workers consume (Celery's ``inspect active_queues``, which each worker
    answers with what ``ITRAIN_QUEUES`` or ``-Q`` gave it); empty when no worker answers within
    ``timeout`` seconds."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {str(q["name"]) for queues in replies.values() for q in (queues or [])}


def unserved(queues: Iterable[str], consumed: set[str]) -> list[str]:
    """The queues of ``queues`` (each once, in order) that no live worker consumes."""
    return [q for q in dict.fromkeys(queues) if q not in consumed]
