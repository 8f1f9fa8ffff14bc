"""``TrainingClient``: what any Python service uses to publish events and get job handles."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson
import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from producer.celery_config import make_celery
from producer.chunks import event_state, is_chunk_result
from producer.errors import (
    BrokerFullError,
    ConfigurationError,
    PermissionDeniedError,
    PublishError,
    QueueFullError,
    ResultIgnoredError,
    ResultTimeoutError,
)
from producer.events import EVENT_LIST, InteractionData, check_dicts
from producer.handles import Chunk, ChunkHandle, JobHandle, handle_for
from producer.linger import Linger
from producer.protocol import (
    TASK_PREDICT,
    TASK_TRAIN_BATCH,
    TASK_TRAIN_STEP,
    EnvelopeTemplate,
    batch_budget,
    event_weight,
    new_task_id,
    result_key,
)
from producer.redis_conn import check_tls_url, connect, redact_url
from producer.sender import Sender
from producer.settings import Settings, get_settings
from producer.stats import read_stats

__all__ = ["EventLike", "TrainingClient"]

EventLike = InteractionData | dict[str, Any]

_T = TypeVar("_T")
_PENDING = object()
_UNREACHABLE = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)


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
        if not linger_ms >= 0:
            raise ConfigurationError(f"linger_ms must be 0 or more milliseconds, got {linger_ms!r}")
        base = settings or get_settings()
        if redis_url is not None:
            base = base.model_copy(
                update={
                    # (model_copy skips the settings' validators: the URL is checked here)
                    "redis_url": check_tls_url(redis_url, "redis_url"),
                    "broker_url": None,
                    "result_backend": None,
                    "store_url": None,
                }
            )
        self.settings = base
        self.app = make_celery(base, main="itrain-producer", producer=True)
        self._broker = connect(base.broker, base.publish_timeout)
        self._store = connect(base.store, base.publish_timeout)
        self._results = connect(base.backend, base.publish_timeout)
        self._sender = Sender(self._broker)
        self._step_templates = {
            ignore: EnvelopeTemplate(TASK_TRAIN_STEP, base.queue, ignore_result=ignore)
            for ignore in (False, True)
        }
        self._batch_templates = {
            ignore: EnvelopeTemplate(TASK_TRAIN_BATCH, base.queue, ignore_result=ignore)
            for ignore in (False, True)
        }
        self._linger = (
            Linger(
                self._push_one,
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

        With ``linger_ms`` the event is buffered and the handle returned before it is sent; a
        send that fails makes the handle's ``get()`` raise the error (``PublishError``,
        ``QueueFullError``) instead of this call.
        """
        data, payload = _event_json(event)
        task_id = new_task_id()
        if self._linger is not None:
            return self._linger.add(task_id, data, ignored=not result)
        envelope = self._step_templates[not result].fill(task_id, b"[" + data + b"]", _argsrepr(payload))
        self._push([envelope])
        return JobHandle(task_id, self.app, ignored=not result)

    def train_many(self, events: Iterable[EventLike], *, results: bool = True) -> list[AsyncResult]:
        """Enqueue many events, one handle each, in order; far cheaper per event than a loop.

        Events travel ``ITRAIN_CHUNK_SIZE`` to a message (task ``itrain.train_batch``) and all
        messages go to Redis in one ``LPUSH`` (all or none). Each chunk has one result, and each
        event's handle (id ``<chunk id>:<index>``) reads its entry of it (``producer.chunks``).
        All or nothing: an invalid event or a full queue raises before anything is sent.
        ``results=False``: fire-and-forget, as ``train_step(..., result=False)``, for every event.
        """
        items = list(events)
        if not items:
            return []
        _, encoded = _payloads(items)
        app, ignored = self.app, not results
        template = self._batch_templates[ignored]
        envelopes: list[bytes] = []
        handles: list[AsyncResult] = []
        for a, b in self._chunks(encoded):
            # One result for the chunk, under its message id (``producer.chunks``). The message's
            # one argument, the list of events, is joined from each event's JSON made above.
            chunk = Chunk(new_task_id(), app)
            args = b"[[" + b",".join(encoded[a:b]) + b"]]"
            envelopes.append(template.fill(chunk.id, args, f"[{b - a} events]"))
            handles.extend(ChunkHandle(chunk, i, ignored=ignored) for i in range(b - a))
        self._push(envelopes)
        return handles

    def predict(self, event: EventLike) -> AsyncResult:
        """Ask the model for its prediction for an event; resolves to ``{model, version, prediction}``."""
        return self._send(TASK_PREDICT, _validate_one(event).model_dump(mode="json"))

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
        except _UNREACHABLE as exc:
            raise PublishError(f"cannot reach {redact_url(self.settings.store)}: {exc}") from exc

    def queue_length(self) -> int:
        """Messages waiting in the queue (a ``train_many`` chunk counts as one)."""
        try:
            return int(self._sender.execute("LLEN", self.settings.queue))
        except _UNREACHABLE as exc:
            raise PublishError(f"cannot reach {redact_url(self.settings.broker)}: {exc}") from exc

    def wait_all(
        self, handles: Sequence[AsyncResult], timeout: float = 60.0, poll: float = 0.01
    ) -> list[Any]:
        """Every handle's result, in order: the result object, or the exception of a failed job.

        Reads results in pipelined ``MGET`` calls, so waiting for 100,000 events costs a few
        round trips instead of one subscription per handle. ``ResultTimeoutError`` when some are
        still pending after ``timeout`` seconds; ``ResultIgnoredError`` at once, before any
        waiting, when a handle was sent with ``result=False`` (it will never have a result).
        With ``linger_ms``, buffered events are sent first, and the error of a send that failed
        (``PublishError``, ``QueueFullError``) is raised.
        """
        ignored = [i for i, h in enumerate(handles) if getattr(h, "ignored", False)]
        if ignored:
            raise ResultIgnoredError(
                f"{len(ignored)} of {len(handles)} handle(s) (the first at index {ignored[0]}) were "
                "sent with result=False / results=False (fire-and-forget): no result is written for "
                "them, so they cannot be waited on"
            )
        if self._linger is not None:
            self._linger.settle(handles)
        backend = self.app.backend
        results: list[Any] = [_PENDING] * len(handles)
        pending = list(range(len(handles)))
        keys = [_key(h) for h in handles]  # once, not on every poll
        deadline = time.monotonic() + timeout
        while pending:
            still: list[int] = []
            for start in range(0, len(pending), 5000):
                part = pending[start : start + 5000]
                # The handles of one chunk share its key: each key is read and decoded once.
                wanted = list(dict.fromkeys([keys[i] for i in part]))
                try:
                    values = self._results.mget(wanted)
                except _UNREACHABLE as exc:
                    raise PublishError(f"cannot reach {redact_url(self.settings.backend)}: {exc}") from exc
                stored = {k: orjson.loads(v) for k, v in zip(wanted, values, strict=True) if v is not None}
                chunk_form = {k: is_chunk_result(meta) for k, meta in stored.items()}  # once a chunk
                for i in part:
                    meta = stored.get(keys[i])
                    if meta is None:
                        still.append(i)
                        continue
                    h = handles[i]
                    if isinstance(h, ChunkHandle):
                        status, result = event_state(meta, h.index, h.id, checked=chunk_form[keys[i]])
                    else:
                        status, result = meta.get("status"), meta.get("result")
                    if status == "SUCCESS":
                        results[i] = result
                    elif status == "FAILURE":
                        results[i] = backend.exception_to_python(result)
                    else:
                        still.append(i)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise ResultTimeoutError(
                        f"{len(pending)} of {len(handles)} job(s) still pending after {timeout:g} s"
                    )
                time.sleep(poll)
        return results

    def flush(self) -> None:
        """Send the events ``linger_ms`` holds back now (nothing to do without linger)."""
        if self._linger is not None:
            self._linger.flush()

    def close(self) -> None:
        """Send what linger holds back, then close the connections. Raises the error of a
        linger batch that could not be sent (its handles raise it too)."""
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

    def _check_queue(self) -> None:
        limit = self.settings.max_queue_length
        if limit and (length := self.queue_length()) >= limit:
            raise QueueFullError(
                f"queue {self.settings.queue!r} holds {length} messages, "
                f"ITRAIN_MAX_QUEUE_LENGTH is {limit}; nothing was enqueued"
            )

    def _chunks(self, encoded: list[bytes]) -> list[tuple[int, int]]:
        """(start, end) of each message, from the events' JSON: at most ``ITRAIN_CHUNK_SIZE``
        events, and small enough for the worker's ``ITRAIN_MAX_MESSAGE_BYTES`` (events with
        large contexts weigh ~20 KB)."""
        max_bytes = self.settings.max_message_bytes
        limit = batch_budget(max_bytes)
        size_cap = self.settings.chunk_size
        if encoded and (max(map(len, encoded)) + event_weight(b"", max_bytes)) * size_cap <= limit:
            # No chunk of the heaviest events could reach the byte budget (the common case):
            # every chunk is ITRAIN_CHUNK_SIZE events, as the loop below would cut them.
            return [(a, min(a + size_cap, len(encoded))) for a in range(0, len(encoded), size_cap)]
        bounds: list[tuple[int, int]] = []
        start, size = 0, 0
        for i, data in enumerate(encoded):
            weight = event_weight(data, max_bytes, f"event {i}")
            if i > start and (i - start >= self.settings.chunk_size or size + weight > limit):
                bounds.append((start, i))
                start, size = i, 0
            size += weight
        bounds.append((start, len(encoded)))
        return bounds

    def _push(self, envelopes: list[bytes]) -> None:
        """LPUSH task messages onto the queue list, as kombu's Redis transport would.

        Training messages skip kombu's publishing path: it builds a new Redis client object and
        sends a ``task-sent`` event per message, several times the cost of the push itself.
        Flower shows these tasks from ``received`` on (the worker sends their events).
        """
        queue = self.settings.queue

        def push() -> None:
            self._check_queue()
            # One LPUSH for all: every message or none (a retry after an error cannot send one
            # twice), and one command for Redis to run. LPUSH of several values pushes them in
            # turn, and kombu's Redis transport consumes with BRPOP: arrival order is kept.
            self._sender.execute("LPUSH", queue, *envelopes)

        self._publish(push)

    def _push_one(self, envelope: bytes) -> None:
        self._push([envelope])

    def _send(self, task: str, payload: dict[str, Any]) -> AsyncResult:
        def send() -> AsyncResult:
            return self.app.send_task(
                task, args=[payload], queue=self.settings.queue, argsrepr=_argsrepr(payload), retry=False
            )

        return self._publish(send)

    def _publish(self, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt``, retried with backoff while Redis is unreachable, for at most
        ``ITRAIN_PUBLISH_TIMEOUT`` seconds in all; then ``PublishError``. A permission the Redis
        user lacks is ``PermissionDeniedError`` at once (retrying cannot help)."""
        deadline = time.monotonic() + self.settings.publish_timeout
        delay = 0.05
        while True:
            try:
                return attempt()
            except redis.ResponseError as exc:
                self._raise_denied(exc)
                # OutOfMemoryError for a command; "OOM" in an EXECABORT for a MULTI/EXEC.
                if not (isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc)):
                    raise
                # noeviction Redis at maxmemory: back-pressure, not an outage. Retrying would
                # only hold the caller; it should slow down (or Redis needs more memory).
                raise BrokerFullError(
                    f"{redact_url(self.settings.broker)} is out of memory (maxmemory reached, "
                    f"noeviction): nothing was enqueued; slow down and retry, or give Redis more memory"
                ) from exc
            except _UNREACHABLE as exc:
                self._raise_denied(exc)  # kombu wraps a NOPERM in its OperationalError
                left = deadline - time.monotonic()
                if left <= delay:
                    raise PublishError(
                        f"cannot publish to {redact_url(self.settings.broker)} within "
                        f"ITRAIN_PUBLISH_TIMEOUT={self.settings.publish_timeout:g} s: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _raise_denied(self, exc: BaseException) -> None:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, redis.exceptions.NoPermissionError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise PermissionDeniedError(
                f"the Redis user of {redact_url(self.settings.broker)} lacks a permission: {cause}; "
                "nothing was enqueued (`itrain acl --role producer` prints what a producer needs)"
            ) from exc


def _argsrepr(payload: dict[str, Any]) -> str:
    # Task events (Flower) show this instead of the arguments: never the raw user id.
    return (
        f"[{{event_id: {payload['event_id']}, action_type: {payload['action_type']}, "
        f"model: {payload.get('model', 'default')}}}]"
    )


def _key(handle: AsyncResult) -> str:
    """Where a handle's result is stored: its chunk's key for a chunk event's handle."""
    key = getattr(handle, "key", None)
    return key if isinstance(key, str) else result_key(handle.id)


# Timestamps whose JSON form the worker reads as the same instant: numbers and strings are read
# by the same rules on both sides, a datetime becomes ISO 8601 with its offset (none: UTC).
_SENT_AS_IS = frozenset({int, float, str, datetime})


def _with_id(event: EventLike) -> EventLike:
    # The id is chosen here, not by the worker, so that a retried call de-duplicates.
    if type(event) is dict and "event_id" not in event:
        return {**event, "event_id": new_task_id()}
    return event


def _as_is(event: EventLike) -> bool:
    """Whether a validated event can be sent as the caller gave it: a plain dict whose every value
    JSON keeps as it is (orjson refuses the rest, which are then sent as ``model_dump``)."""
    return type(event) is dict and type(event.get("timestamp")) in _SENT_AS_IS


def _event_json(event: EventLike) -> tuple[bytes, dict[str, Any]]:
    """One event validated, as the JSON ``train_step`` sends and the fields its ``argsrepr`` shows.

    Exactly ``InteractionData.model_dump(mode="json")`` (the contract's form of the
    ``itrain.train_step`` argument, which other services may read off the queue), serialised by
    pydantic in one call; an ``event_id`` is chosen here when missing, so a retry de-duplicates.
    """
    model = _validate_one(_with_id(event))
    shown = {"event_id": model.event_id, "action_type": model.action_type, "model": model.model}
    return model.__pydantic_serializer__.to_json(model), shown


def _payloads(events: list[EventLike]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The events of ``train_many`` validated (all or nothing), in order: as objects ready for
    JSON, and as each one's JSON (what ``_chunks`` weighs them by).

    Plain dicts are checked against the model's field types without building a model
    (``check_dicts``) and go as the caller gave them, with an ``event_id`` added where missing:
    the chunk form is ours (README, "Enqueue from any language"), and the worker validates each
    event again with the same types. Anything else goes as ``model_dump(mode="json")``.
    """
    items = [_with_id(e) for e in events]
    if all(_as_is(e) for e in items):
        check_dicts(items)  # type: ignore[arg-type]
        try:
            return items, [orjson.dumps(e) for e in items]  # type: ignore[return-value]
        except TypeError:
            pass  # some value JSON cannot hold as is: the models' form for all
    payloads = EVENT_LIST.dump_python(EVENT_LIST.validate_python(items), mode="json")
    return payloads, [orjson.dumps(p) for p in payloads]


def _validate_one(event: EventLike) -> InteractionData:
    if isinstance(event, InteractionData):
        return event
    return InteractionData.model_validate(event)
