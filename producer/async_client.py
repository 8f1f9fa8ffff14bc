"""``AsyncTrainingClient``: ``TrainingClient`` for asyncio services (FastAPI, aiohttp).

Every call awaits its Redis I/O (``redis.asyncio``) and never blocks the event loop. Messages,
validation, handles and result decoding are the sync client's own (``producer.outgoing``,
``producer.waiting``, ``producer.linger``): a handle from either client, or its id, is read by
the other and by Celery (``AsyncResult(id).get()``), and the worker cannot tell them apart.

Waiting polls the result keys with ``MGET`` (``asyncio.sleep`` between rounds, from ``poll`` up
to 0.1 s), so many waiting tasks cost a few commands each, not a subscription each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from celery.result import AsyncResult

from producer.async_linger import AsyncLinger
from producer.celery_config import make_celery
from producer.client import client_settings, result_flag
from producer.handles import JobHandle, handle_for
from producer.keys import ROUTES
from producer.linger import Build, LingerBuffers
from producer.outgoing import EventLike, Outgoing, Pushes, event_json
from producer.protocol import new_task_id
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
from producer.redis_conn import connection_class
from producer.replicas import ReplicaWait
from producer.routes import Routes
from producer.sentinel import async_master_client, is_sentinel_url
from producer.settings import Settings
from producer.stats import queue_stats, stats_from_replies
from producer.waiting import Collector, check_not_ignored

__all__ = ["AsyncTrainingClient"]

_T = TypeVar("_T")
#: The longest pause between two reads of pending results.
_MAX_POLL = 0.1


class AsyncTrainingClient:
    """Publishes interaction events from asyncio code; use it as ``async with``.

    ``await train_step(event)`` and ``await train_many(events)`` return the sync client's
    handles (Celery ``AsyncResult`` objects; read them with ``await client.wait(handle)`` here,
    since their own ``get()`` blocks). Invalid events raise ``InvalidEventError`` before anything
    is sent; ``ITRAIN_PUBLISH_TIMEOUT``, ``ITRAIN_MAX_QUEUE_LENGTH`` and TLS/ACL URLs work as for
    ``TrainingClient``. ``linger_ms`` above 0 coalesces ``train_step`` calls into batch messages;
    they are sent on ``aclose()`` (and on leaving ``async with``), not at interpreter exit.

    Making a client builds its Celery app (tens of milliseconds, blocking): make one at startup
    and share it between tasks, as a Redis connection pool is shared.
    """

    def __init__(
        self, redis_url: str | None = None, *, settings: Settings | None = None, linger_ms: float = 0
    ) -> None:
        base = client_settings(redis_url, settings, linger_ms)
        self.settings = base
        #: The handles' app (Celery needs one for ``AsyncResult``); it opens no connection itself.
        self.app = make_celery(base, main="itrain-producer", producer=True)
        # Celery makes its result backend on first use (imports included, tens of milliseconds):
        # here, once, rather than inside the first awaited call.
        _ = self.app.backend
        self._routes = Routes(base.queue, base.routes_ttl)
        self._outgoing = Outgoing(base, self.app, self._routes)
        self._redis: dict[str, aioredis.Redis] = {}
        self._broker = self._connect(base.broker)
        self._store = self._connect(base.store)
        self._results = self._connect(base.backend)
        self._replicas = ReplicaWait.of(base, base.broker)
        self._linger = (
            AsyncLinger(
                self._push_lingered,
                LingerBuffers(
                    self.app,
                    queue=base.queue,
                    linger_ms=linger_ms,
                    max_events=base.chunk_size,
                    max_message_bytes=base.max_message_bytes,
                ),
            )
            if linger_ms > 0
            else None
        )

    # -- publishing ---------------------------------------------------------------------------

    async def train_step(self, event: EventLike, *, result: bool = True) -> AsyncResult:
        """Enqueue one training step, as ``TrainingClient.train_step`` (``ReplicationError`` with
        ``ITRAIN_MIN_REPLICAS`` likewise); returns its handle."""
        data, shown = event_json(event)
        task_id = new_task_id()
        if self._linger is not None:
            # (routed when its batch is sent: no I/O here)
            return await self._linger.add(
                task_id, data, shown["event_id"], ignored=not result, model=shown["model"]
            )
        await self._fresh_routes()
        queue, message = self._outgoing.step(task_id, data, shown, result=result)
        await self._push([(queue, [message])], [shown["event_id"]])
        return JobHandle(task_id, self.app, ignored=not result)

    async def train_many(
        self, events: Iterable[EventLike], *, result: bool = True, results: bool | None = None
    ) -> list[AsyncResult]:
        """Enqueue many events in one push, each on its model's queue, as
        ``TrainingClient.train_many``; one handle each, in order (``results=`` is the deprecated
        spelling of ``result=``)."""
        await self._fresh_routes()
        pushes, handles, event_ids = self._outgoing.many(events, result=result_flag(result, results))
        if pushes:
            await self._push(pushes, event_ids)
        return handles

    async def predict(self, event: EventLike, *, timeout: float = 30.0) -> dict[str, Any]:
        """The model's prediction for an event: ``{model, version, prediction}``, from a worker
        (an ``itrain.predict`` task). ``ResultTimeoutError`` after ``timeout`` seconds."""
        await self._fresh_routes()
        task_id, queue, envelope = self._outgoing.predict(event)
        await self._push([(queue, [envelope])], [], check_queue=False, replicated=False)
        prediction: dict[str, Any] = await self.wait(JobHandle(task_id, self.app), timeout=timeout)
        return prediction

    # -- reading -------------------------------------------------------------------------------

    def handle(self, task_id: str) -> AsyncResult:
        """The handle of a job from its id, as ``TrainingClient.handle``."""
        return handle_for(task_id, self.app)

    async def wait(self, handle: AsyncResult | str, timeout: float = 60.0, poll: float = 0.005) -> Any:
        """A job's result object once it is ready; raises the job's error if it failed (as
        ``handle.get()`` does), ``ResultTimeoutError`` after ``timeout`` seconds."""
        h = self.handle(handle) if isinstance(handle, str) else handle
        (outcome,) = await self.wait_all([h], timeout=timeout, poll=poll)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def wait_all(
        self, handles: Sequence[AsyncResult], timeout: float = 60.0, poll: float = 0.005
    ) -> list[Any]:
        """Every handle's result, in order, as ``TrainingClient.wait_all``: the result object, or
        the exception of a failed job; ``ResultTimeoutError``, ``ResultIgnoredError`` likewise."""
        check_not_ignored(handles)
        if self._linger is not None:
            await self._linger.settle(handles)
        collector = Collector(handles, self.app.backend, timeout)
        while True:
            for part, keys in collector.parts():
                try:
                    values = await self._results.mget(keys)
                except UNREACHABLE as exc:
                    raise unreachable(self.settings.backend, exc) from exc
                collector.take(part, keys, values)
            collector.end_round()
            if collector.done:
                return collector.results
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, _MAX_POLL)

    async def stats(self, model: str = "default") -> dict[str, Any]:
        """The model's statistics, the same object as ``itrain stats --json``."""
        pipe = self._store.pipeline(transaction=False)
        queue_stats(pipe, model)
        try:
            replies = await pipe.execute()
        except UNREACHABLE as exc:
            raise unreachable(self.settings.store, exc) from exc
        return stats_from_replies(model, replies)

    async def queue_length(self, queue: str | None = None) -> int:
        """Messages waiting in ``queue`` (default ``ITRAIN_QUEUE``; a ``train_many`` chunk counts
        as one)."""
        try:
            return int(await self._broker.llen(queue or self.settings.queue))
        except UNREACHABLE as exc:
            raise unreachable(self.settings.broker, exc) from exc

    async def queue_of(self, model: str) -> str:
        """The queue ``model``'s events go to now, as ``TrainingClient.queue_of``."""
        await self._fresh_routes()
        return self._routes.queue(model)

    # -- lifecycle -------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send the events ``linger_ms`` holds back now (nothing to do without linger)."""
        if self._linger is not None:
            await self._linger.flush()

    async def aclose(self) -> None:
        """Send what linger holds back, then close the connections. Raises the error of a
        linger batch that could not be sent (its handles raise it too)."""
        try:
            if self._linger is not None:
                await self._linger.aclose()
        finally:
            for client in self._redis.values():
                await client.aclose()
            self.app.close()

    async def __aenter__(self) -> AsyncTrainingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals -------------------------------------------------------------------------------

    def _connect(self, url: str) -> aioredis.Redis:
        # One client (and pool) per distinct URL: the roles usually share one Redis.
        if url not in self._redis:
            timeout = self.settings.publish_timeout
            self._redis[url] = (
                async_master_client(url, timeout)
                if is_sentinel_url(url)
                else aioredis.Redis.from_url(
                    url,
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                    health_check_interval=30,
                    **connection_class(url, asynchronous=True),
                )
            )
        return self._redis[url]

    async def _push(
        self,
        pushes: Pushes,
        event_ids: list[str],
        *,
        check_queue: bool = True,
        replicated: bool = True,
    ) -> None:
        """Push task messages onto their queue lists in one push (all or none), as the sync client
        does (``producer.publishing.push_commands``); ``QueueFullError`` first when one of the
        queues is at ``ITRAIN_MAX_QUEUE_LENGTH``; with ``ITRAIN_MIN_REPLICAS`` (and
        ``replicated``), ``WAIT`` in the same pipeline."""
        replicas = self._replicas if replicated else None
        commands = push_commands(pushes)

        async def push() -> int:
            if check_queue and self.settings.max_queue_length:
                queues = [queue for queue, _ in pushes]
                lengths = await self._pipeline([("LLEN", q) for q in queues], raise_on_error=True)
                full = first_full(lengths, queues, self.settings)
                if full is not None:
                    raise full
            if replicas is None and len(commands) == 1:
                await self._broker.execute_command(*commands[0])  # type: ignore[no-untyped-call]
                return 0
            # One pipeline is one connection: WAIT counts the writes of its own connection only.
            # (Not redis-py's transaction pipeline: WAIT inside MULTI would not wait.)
            extra = [] if replicas is None else [replicas.command]
            replies = await self._pipeline([*commands, *extra], raise_on_error=False)
            pushed = push_error(replies[: len(commands)])
            if pushed is not None:
                raise pushed  # nothing was enqueued (WAIT then waits for nothing)
            if replicas is None:
                return 0
            acked = replies[-1]
            if isinstance(acked, redis.ResponseError):
                raise replicas.refused(acked, event_ids) from acked
            return int(acked)

        acked = await self._publish(push)
        if replicas is not None:
            replicas.check(acked, event_ids)

    async def _pipeline(self, commands: list[tuple[Any, ...]], *, raise_on_error: bool) -> list[Any]:
        pipe = self._broker.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
        return replies

    async def _push_lingered(self, build: Build, event_ids: list[str]) -> None:
        """Send a linger batch: its events routed by the routes as they are now."""
        await self._fresh_routes()
        await self._push(build(self._routes.queue), event_ids)

    async def _fresh_routes(self) -> None:
        """Read ``itrain:routes`` again when the client's copy is due (``producer.routes``)."""
        if not self._routes.due():
            return

        async def read() -> None:
            try:
                self._routes.update(await self._broker.hgetall(ROUTES))
            except redis.exceptions.NoPermissionError as exc:
                self._routes.unreadable(exc)

        await self._publish(read)

    async def _publish(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``attempt``, retried while Redis is unreachable for at most ``ITRAIN_PUBLISH_TIMEOUT``
        seconds in all (``producer.publishing``)."""
        backoff = Backoff(self.settings)
        while True:
            try:
                return await attempt()
            except redis.ResponseError as exc:
                if refuses_writes(exc):
                    # Not a master that can take writes now (our connections turn these replies
                    # into a lost connection; any other that lets one through): retry as unreachable.
                    await asyncio.sleep(backoff.next_delay(exc))
                    continue
                error = refused(exc, self.settings)
                if error is exc:
                    raise
                raise error from exc
            except UNREACHABLE as exc:
                await asyncio.sleep(backoff.next_delay(exc))
