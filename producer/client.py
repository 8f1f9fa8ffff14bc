"""``TrainingClient``: what any Python service uses to publish events and get job handles."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
from celery.result import AsyncResult

from producer.celery_config import make_celery
from producer.errors import ConfigurationError
from producer.formats import FORMAT_HEADER, MESSAGE_FORMAT
from producer.handles import JobHandle, handle_for
from producer.keys import ROUTES
from producer.linger import Build, Linger
from producer.outgoing import EventLike, Outgoing, Pushes, argsrepr, event_json, validate_one
from producer.protocol import TASK_PREDICT, new_task_id
from producer.publishing import (
    UNREACHABLE,
    Backoff,
    first_full,
    push_commands,
    push_error,
    refused,
    refuses_writes,
    unreachable,
)
from producer.redis_conn import check_tls_url, connect
from producer.replicas import ReplicaWait
from producer.routes import Routes
from producer.sender import Sender
from producer.settings import Settings, get_settings
from producer.stats import read_stats
from producer.waiting import Collector, check_not_ignored

__all__ = ["EventLike", "TrainingClient", "client_settings", "result_flag"]

_T = TypeVar("_T")


def client_settings(redis_url: str | None, settings: Settings | None, linger_ms: float) -> Settings:
    """A client's settings: ``settings`` (or the environment's), with every role on ``redis_url``
    when one is given. ``ConfigurationError`` for a bad ``linger_ms`` or URL."""
    if not linger_ms >= 0:
        raise ConfigurationError(f"linger_ms must be 0 or more milliseconds, got {linger_ms!r}")
    base = settings or get_settings()
    if redis_url is None:
        return base
    base.complete(redis_url, "redis_url")  # a sentinel URL names its master
    return base.model_copy(
        update={
            # (model_copy skips the settings' validators: the URL is checked here)
            "redis_url": check_tls_url(redis_url, "redis_url"),
            "broker_url": None,
            "result_backend": None,
            "store_url": None,
        }
    )


def result_flag(result: bool, results: bool | None) -> bool:
    """``train_many``'s ``result=``, with the older ``results=`` spelling still accepted (with a
    ``DeprecationWarning``)."""
    if results is None:
        return result
    warnings.warn(
        "train_many(results=...) is deprecated: use result=..., as for train_step",
        DeprecationWarning,
        stacklevel=3,
    )
    return results


class TrainingClient:
    """Publishes interaction events; every call returns Celery ``AsyncResult`` job handles at once.

    Events are validated before anything is sent: an invalid one raises
    ``pydantic.ValidationError`` (a ``ValueError``) and nothing is enqueued.

    ``linger_ms`` above 0: ``train_step`` calls from every thread are buffered for up to that
    many milliseconds and sent together as ``itrain.train_batch`` messages (see
    ``producer.linger``); ``close()`` sends what is left. Thread-safe.
    """

    def __init__(
        self, redis_url: str | None = None, *, settings: Settings | None = None, linger_ms: float = 0
    ) -> None:
        base = client_settings(redis_url, settings, linger_ms)
        self.settings = base
        self.app = make_celery(base, main="itrain-producer", producer=True)
        self._broker = connect(base.broker, base.publish_timeout)
        self._store = connect(base.store, base.publish_timeout)
        self._results = connect(base.backend, base.publish_timeout)
        self._sender = Sender(self._broker)
        self._replicas = ReplicaWait.of(base, base.broker)
        self._routes = Routes(base.queue, base.routes_ttl)
        self._outgoing = Outgoing(base, self.app, self._routes)
        self._linger = (
            Linger(
                self._push_lingered,
                self.app,
                queue=base.queue,
                linger_ms=linger_ms,
                max_events=base.chunk_size,
                max_message_bytes=base.max_message_bytes,
            )
            if linger_ms > 0
            else None
        )

    # -- publishing ---------------------------------------------------------------------------

    def train_step(self, event: EventLike, *, result: bool = True) -> AsyncResult:
        """Enqueue one training step; the handle resolves to the contract's result object.

        ``result=False``: fire-and-forget (Celery's ``ignore_result``). The event trains as any
        other, a failure is still dead-lettered and Flower still shows the task, but no result
        is written: the handle's ``get()`` returns ``None`` at once, its ``state`` stays
        ``PENDING``, and ``wait_all`` on it raises ``ResultIgnoredError``.

        ``ITRAIN_MIN_REPLICAS`` above 0: returns once that many replicas hold the message, else
        raises ``ReplicationError`` (the message is on the master; sending the event again is safe).

        With ``linger_ms`` the event is buffered and the handle returned before it is sent; a
        send that fails makes the handle's ``get()`` raise the error (``PublishError``,
        ``QueueFullError``) instead of this call, and a ``ReplicationError`` comes from
        ``flush()``, ``close()`` and ``wait_all`` (the handle stays live).
        """
        data, shown = event_json(event)
        task_id = new_task_id()
        if self._linger is not None:
            # (routed when its batch is sent: no I/O here)
            return self._linger.add(
                task_id, data, shown["event_id"], ignored=not result, model=shown["model"]
            )
        self._fresh_routes()
        queue, message = self._outgoing.step(task_id, data, shown, result=result)
        self._push([(queue, [message])], [shown["event_id"]])
        return JobHandle(task_id, self.app, ignored=not result)

    def train_many(
        self, events: Iterable[EventLike], *, result: bool = True, results: bool | None = None
    ) -> list[AsyncResult]:
        """Enqueue many events, one handle each, in order; far cheaper per event than a loop.

        Events travel ``ITRAIN_CHUNK_SIZE`` to a message (task ``itrain.train_batch``), each on
        its model's queue (``producer.routes``; each queue's events in the caller's order), and
        all messages go to Redis in one push: one ``LPUSH``, or one ``MULTI`` of an ``LPUSH`` per
        queue (all or none). Each chunk has one result, and each event's handle (id
        ``<chunk id>:<index>``) reads its entry of it (``producer.chunks``). All or nothing: an
        invalid event, or any of the queues at ``ITRAIN_MAX_QUEUE_LENGTH``, raises before
        anything is sent.
        ``result=False``: fire-and-forget, as ``train_step(..., result=False)``, for every event
        (``results=`` is its deprecated spelling). ``ITRAIN_MIN_REPLICAS``: one ``WAIT`` after the
        push, as for ``train_step``; ``ReplicationError.event_ids`` names every event.
        """
        self._fresh_routes()
        pushes, handles, event_ids = self._outgoing.many(events, result=result_flag(result, results))
        if pushes:
            self._push(pushes, event_ids)
        return handles

    def predict(self, event: EventLike) -> AsyncResult:
        """Ask the model for its prediction for an event; resolves to ``{model, version, prediction}``."""
        payload = validate_one(event).model_dump(mode="json")
        self._fresh_routes()
        queue = self._routes.queue(payload["model"])

        def send() -> AsyncResult:
            return self.app.send_task(
                TASK_PREDICT,
                args=[payload],
                queue=queue,
                argsrepr=argsrepr(payload),
                headers={FORMAT_HEADER: MESSAGE_FORMAT},
                retry=False,
            )

        return self._publish(send)

    # -- reading -------------------------------------------------------------------------------

    def handle(self, task_id: str) -> AsyncResult:
        """The handle of a job from its id (``handle.id``), e.g. one kept by another process.

        A ``train_many`` event's id, ``<chunk id>:<index>``, gives a handle that reads its
        chunk's result; any other id a plain Celery ``AsyncResult``. ``client.app.AsyncResult(id)``
        does the same.
        """
        return handle_for(task_id, self.app)

    def stats(self, model: str = "default") -> dict[str, Any]:
        """The model's statistics, the same object as ``itrain stats --json``."""
        try:
            return read_stats(self._store, model)
        except UNREACHABLE as exc:
            raise unreachable(self.settings.store, exc) from exc

    def queue_length(self, queue: str | None = None) -> int:
        """Messages waiting in ``queue`` (default ``ITRAIN_QUEUE``; a ``train_many`` chunk counts
        as one)."""
        try:
            return int(self._sender.execute("LLEN", queue or self.settings.queue))
        except UNREACHABLE as exc:
            raise unreachable(self.settings.broker, exc) from exc

    def queue_of(self, model: str) -> str:
        """The queue ``model``'s events go to now (``producer.routes``), from the client's copy of
        the routes, read again when it is ``ITRAIN_ROUTES_TTL`` seconds old."""
        self._fresh_routes()
        return self._routes.queue(model)

    def wait_all(
        self, handles: Sequence[AsyncResult], timeout: float = 60.0, poll: float = 0.01
    ) -> list[Any]:
        """Every handle's result, in order: the result object, or the exception of a failed job.

        Reads results in pipelined ``MGET`` calls, so waiting for 100,000 events costs a few
        round trips instead of one subscription per handle. ``ResultTimeoutError`` when some are
        still pending after ``timeout`` seconds; ``ResultIgnoredError`` at once, before any
        waiting, when a handle was sent with ``result=False`` (it will never have a result).
        With ``linger_ms``, buffered events are sent first, and the error of a send that failed
        (``PublishError``, ``QueueFullError``) is raised, or a ``ReplicationError`` naming the
        events of these handles that too few replicas acknowledged.
        """
        check_not_ignored(handles)
        if self._linger is not None:
            self._linger.settle(handles)
        collector = Collector(handles, self.app.backend, timeout)
        while True:
            for part, keys in collector.parts():
                try:
                    values = self._results.mget(keys)
                except UNREACHABLE as exc:
                    raise unreachable(self.settings.backend, exc) from exc
                collector.take(part, keys, values)
            collector.end_round()
            if collector.done:
                return collector.results
            time.sleep(poll)

    def flush(self) -> None:
        """Send the events ``linger_ms`` holds back now (nothing to do without linger).
        ``ReplicationError`` naming every event sent since the last report whose push too few
        replicas acknowledged (a failed send is raised by its handles and ``close()``)."""
        if self._linger is not None:
            self._linger.flush()

    def close(self) -> None:
        """Send what linger holds back, then close the connections. Raises the error of a
        linger batch that could not be sent (its handles raise it too), else a
        ``ReplicationError`` not reported by ``flush()`` yet."""
        try:
            if self._linger is not None:
                self._linger.close()
        finally:
            self._sender.close()
            self._broker.close()
            self._store.close()
            self._results.close()
            self.app.close()

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _push(self, pushes: Pushes, event_ids: list[str]) -> None:
        """LPUSH task messages onto their queue lists, as kombu's Redis transport would, all in
        one push (``producer.publishing.push_commands``); with ``ITRAIN_MIN_REPLICAS``, then
        ``WAIT`` on the same connection (``producer.replicas``).

        Training messages skip kombu's publishing path: it builds a new Redis client object and
        sends a ``task-sent`` event per message, several times the cost of the push itself.
        Flower shows these tasks from ``received`` on (the worker sends their events).
        """
        replicas = self._replicas
        commands = push_commands(pushes)

        def push() -> int:
            if self.settings.max_queue_length:
                queues = [queue for queue, _ in pushes]
                lengths = self._sender.execute_all(*(("LLEN", q) for q in queues))
                full = first_full(lengths, queues, self.settings)
                if full is not None:
                    raise full
            if replicas is None and len(commands) == 1:
                self._sender.execute(*commands[0])
                return 0
            # Sent together: WAIT counts the writes of its own connection only.
            extra = [] if replicas is None else [replicas.command]
            replies = self._sender.execute_all(*commands, *extra, raise_on_error=False)
            pushed = push_error(replies[: len(commands)])
            if pushed is not None:
                raise pushed  # nothing was enqueued (WAIT then waits for nothing)
            if replicas is None:
                return 0
            acked = replies[-1]
            if isinstance(acked, redis.ResponseError):
                raise replicas.refused(acked, event_ids) from acked
            return int(acked)

        acked = self._publish(push)
        if replicas is not None:
            replicas.check(acked, event_ids)

    def _push_lingered(self, build: Build, event_ids: list[str]) -> None:
        """Send a linger batch: its events routed by the routes as they are now."""
        self._fresh_routes()
        self._push(build(self._routes.queue), event_ids)

    def _fresh_routes(self) -> None:
        """Read ``itrain:routes`` again when the client's copy is due (``producer.routes``)."""
        if not self._routes.due():
            return

        def read() -> None:
            try:
                self._routes.update(self._sender.execute("HGETALL", ROUTES))
            except redis.exceptions.NoPermissionError as exc:
                self._routes.unreadable(exc)

        self._publish(read)

    def _publish(self, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt``, retried with backoff while Redis is unreachable, for at most
        ``ITRAIN_PUBLISH_TIMEOUT`` seconds in all (``producer.publishing``)."""
        backoff = Backoff(self.settings)
        while True:
            try:
                return attempt()
            except redis.ResponseError as exc:
                if refuses_writes(exc):
                    # Not a master that can take writes now (our connections turn these replies
                    # into a lost connection; any other that lets one through): retry as unreachable.
                    time.sleep(backoff.next_delay(exc))
                    continue
                error = refused(exc, self.settings)
                if error is exc:
                    raise
                raise error from exc
            except UNREACHABLE as exc:
                time.sleep(backoff.next_delay(exc))
