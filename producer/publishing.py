"""What a failed publish means, for both clients: retry, or which of our errors to raise.

A client retries while Redis is unreachable, or reachable but unable to take writes now (a demoted
master's ``READONLY`` or ``-UNBLOCKED``, a master short of replicas' ``NOREPLICAS``:
``producer.demotion``, whose connections reconnect on them), for at most
``ITRAIN_PUBLISH_TIMEOUT`` seconds in all (``Backoff``), then raises ``PublishError`` naming the
last cause. A permission the Redis user lacks is
``PermissionDeniedError`` at once, and an out-of-memory refusal ``BrokerFullError`` at once
(retrying cannot help, or would only hold the caller). The sleeping between tries is the
client's own (``time.sleep`` or ``asyncio.sleep``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
from kombu.exceptions import OperationalError

from producer.demotion import refuses_writes
from producer.errors import BrokerFullError, PermissionDeniedError, PublishError, QueueFullError
from producer.redis_conn import redact_url
from producer.settings import Settings

__all__ = [
    "UNREACHABLE",
    "Backoff",
    "denied",
    "first_full",
    "push_commands",
    "push_error",
    "queue_full",
    "refused",
    "refuses_writes",
    "unreachable",
]

#: Errors that say Redis could not be reached (redis-py's, sync or asyncio, kombu's, the socket's).
UNREACHABLE = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)


class Backoff:
    """Delays between publish tries: 50 ms doubling up to 0.5 s, within ``ITRAIN_PUBLISH_TIMEOUT``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._deadline = time.monotonic() + settings.publish_timeout
        self._delay = 0.05

    def next_delay(self, exc: BaseException) -> float:
        """How long to wait before the next try after ``exc`` (Redis unreachable); raises
        ``PermissionDeniedError`` or, once the time is spent, ``PublishError``."""
        error = denied(exc, self._settings)  # kombu wraps a NOPERM in its OperationalError
        if error is not None:
            raise error from exc
        delay = self._delay
        if self._deadline - time.monotonic() <= delay:
            raise PublishError(
                f"cannot publish to {redact_url(self._settings.broker)} within "
                f"ITRAIN_PUBLISH_TIMEOUT={self._settings.publish_timeout:g} s: {exc}"
            ) from exc
        self._delay = min(delay * 2, 0.5)
        return delay


def refused(exc: redis.ResponseError, settings: Settings) -> BaseException:
    """The error to raise for a command Redis refused: ``PermissionDeniedError``,
    ``BrokerFullError`` (out of memory under ``noeviction``), or ``exc`` itself."""
    error = denied(exc, settings)
    if error is not None:
        return error
    # OutOfMemoryError for a command; "OOM" in an EXECABORT for a MULTI/EXEC.
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc):
        # noeviction Redis at maxmemory: back-pressure, not an outage. Retrying would only hold
        # the caller; it should slow down (or Redis needs more memory).
        return BrokerFullError(
            f"{redact_url(settings.broker)} is out of memory (maxmemory reached, "
            f"noeviction): nothing was enqueued; slow down and retry, or give Redis more memory"
        )
    return exc


def denied(exc: BaseException, settings: Settings) -> PermissionDeniedError | None:
    """``PermissionDeniedError`` when ``exc`` is, or was raised from, a ``NOPERM`` reply."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, redis.exceptions.NoPermissionError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    return PermissionDeniedError(
        f"the Redis user of {redact_url(settings.broker)} lacks a permission: {cause}; "
        "nothing was enqueued (`itrain acl --role producer` prints what a producer needs)"
    )


def unreachable(url: str, exc: BaseException) -> PublishError:
    """``PublishError`` for a read that could not reach ``url``."""
    return PublishError(f"cannot reach {redact_url(url)}: {exc}")


def queue_full(length: int, settings: Settings, queue: str | None = None) -> QueueFullError | None:
    """``QueueFullError`` naming ``queue`` (default ``ITRAIN_QUEUE``) when it holds ``length``
    messages and that is at ``ITRAIN_MAX_QUEUE_LENGTH`` (a limit of each queue on its own)."""
    limit = settings.max_queue_length
    if limit and length >= limit:
        return QueueFullError(
            f"queue {queue or settings.queue!r} holds {length} messages, "
            f"ITRAIN_MAX_QUEUE_LENGTH is {limit}; nothing was enqueued"
        )
    return None


def first_full(lengths: Sequence[Any], queues: Sequence[str], settings: Settings) -> QueueFullError | None:
    """``QueueFullError`` for the first of ``queues`` whose length (``LLEN`` replies, in order) is
    at ``ITRAIN_MAX_QUEUE_LENGTH``, else None."""
    for queue, length in zip(queues, lengths, strict=True):
        full = queue_full(int(length), settings, queue)
        if full is not None:
            return full
    return None


def push_commands(pushes: Sequence[tuple[str, Sequence[bytes]]]) -> list[tuple[Any, ...]]:
    """The Redis commands that push every message of ``pushes`` (queue, messages) at once.

    One queue: one ``LPUSH`` of all its messages (every message or none; LPUSH of several
    values pushes them in turn, and workers consume from the other end: arrival order is kept).
    Several queues: their ``LPUSH`` commands in one ``MULTI``/``EXEC``, all or none (a command
    Redis refuses while queueing, ``OOM`` or ``NOPERM``, aborts the transaction). The only way
    part of it can land is a queue key that is not a list (``WRONGTYPE`` at ``EXEC``), which
    ``push_error`` reports."""
    lpushes = [("LPUSH", queue, *messages) for queue, messages in pushes]
    if len(lpushes) == 1:
        return lpushes
    return [("MULTI",), *lpushes, ("EXEC",)]


def push_error(replies: Sequence[Any]) -> redis.ResponseError | None:
    """The error of a push from the replies to ``push_commands``, or None when every message is in
    Redis: a refusal while queueing comes before ``EXECABORT`` and names the cause better."""
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            return reply
    if len(replies) > 1 and isinstance(replies[-1], list):  # EXEC: the LPUSH replies
        for reply in replies[-1]:
            if isinstance(reply, redis.ResponseError):
                return reply
    return None
