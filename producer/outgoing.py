"""What a client sends, built without I/O: events validated, their JSON, the task messages and
the handles that go with them. ``TrainingClient`` and ``AsyncTrainingClient`` both build their
messages here and differ only in how they hand them to Redis.

An invalid event raises ``InvalidEventError`` (also a ``pydantic.ValidationError``) with
pydantic's field-level details, before any message is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

import orjson
from celery import Celery
from celery.result import AsyncResult
from pydantic import ValidationError

from producer.errors import InvalidEventError
from producer.events import EVENT_LIST, InteractionData, check_dicts
from producer.handles import Chunk, ChunkHandle
from producer.protocol import (
    TASK_PREDICT,
    TASK_TRAIN_BATCH,
    TASK_TRAIN_STEP,
    EnvelopeTemplate,
    batch_budget,
    event_weight,
    new_task_id,
)
from producer.routes import DEFAULT_MODEL, Routes, group_by_queue
from producer.settings import Settings

__all__ = ["EventLike", "Outgoing", "Pushes", "argsrepr", "event_json", "payloads", "validate_one"]

EventLike = InteractionData | dict[str, Any]


#: ``train_many``'s messages: each queue with its messages, queues in the order their first event
#: came (every message of every queue goes to Redis in one push, all or none).
Pushes = list[tuple[str, list[bytes]]]


class Outgoing:
    """The task messages of one client's settings (queue, chunk size, message size), each on the
    queue its model's route names (``routes``: the client keeps it fresh)."""

    def __init__(self, settings: Settings, app: Celery, routes: Routes | None = None) -> None:
        self.settings = settings
        self.app = app
        self.routes = routes or Routes(settings.queue, settings.routes_ttl)
        self._templates: dict[tuple[str, bool, str], EnvelopeTemplate] = {}

    def template(self, task: str, ignore_result: bool, queue: str) -> EnvelopeTemplate:
        """The message template of ``task`` on ``queue`` (made once per queue)."""
        key = (task, ignore_result, queue)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = EnvelopeTemplate(task, queue, ignore_result=ignore_result)
        return template

    def step(self, task_id: str, data: bytes, shown: dict[str, Any], *, result: bool) -> tuple[str, bytes]:
        """(queue, message) of one event's ``itrain.train_step`` (its JSON and shown fields from
        ``event_json``), the queue its model's route names."""
        queue = self.routes.queue(shown["model"])
        message = self.template(TASK_TRAIN_STEP, not result, queue).fill(
            task_id, b"[" + data + b"]", argsrepr(shown)
        )
        return queue, message

    def predict(self, event: EventLike) -> tuple[str, str, bytes]:
        """(task id, queue, message) of an ``itrain.predict`` call for ``event``."""
        data, shown = event_json(event)
        task_id = new_task_id()
        queue = self.routes.queue(shown["model"])
        message = self.template(TASK_PREDICT, False, queue).fill(task_id, b"[" + data + b"]", argsrepr(shown))
        return task_id, queue, message

    def many(
        self, events: Iterable[EventLike], *, result: bool
    ) -> tuple[Pushes, list[AsyncResult], list[str]]:
        """``train_many``'s messages by queue, ``ITRAIN_CHUNK_SIZE`` events each, one handle per
        event in input order, and the events' ids (generated ones included). Events are grouped
        by their model's route, each group in the caller's order; each chunk has one result,
        which each event's handle (id ``<chunk id>:<index>``) reads its entry of
        (``producer.chunks``). All or nothing: an invalid event raises here."""
        items = list(events)
        if not items:
            return [], [], []
        sent, encoded = payloads(items)
        table, default = self.routes.table, self.routes.default
        if not table:  # no model has a queue of its own (the common case): no grouping at all
            envelopes, handles = self._chunked(encoded, default, result)
            return [(default, envelopes)], handles, [p["event_id"] for p in sent]
        groups = group_by_queue([table.get(p.get("model", DEFAULT_MODEL), default) for p in sent])
        if len(groups) == 1:
            (queue,) = groups
            envelopes, handles = self._chunked(encoded, queue, result)
            return [(queue, envelopes)], handles, [p["event_id"] for p in sent]
        pushes: Pushes = []
        placed: list[AsyncResult | None] = [None] * len(items)
        for queue, positions in groups.items():
            envelopes, group_handles = self._chunked([encoded[i] for i in positions], queue, result)
            pushes.append((queue, envelopes))
            for i, handle in zip(positions, group_handles, strict=True):
                placed[i] = handle
        return pushes, cast(list[AsyncResult], placed), [p["event_id"] for p in sent]

    def _chunked(
        self, encoded: list[bytes], queue: str, result: bool
    ) -> tuple[list[bytes], list[AsyncResult]]:
        """The ``itrain.train_batch`` messages of ``encoded`` on ``queue``, and a handle per event."""
        app, ignored = self.app, not result
        template = self.template(TASK_TRAIN_BATCH, ignored, queue)
        envelopes: list[bytes] = []
        handles: list[AsyncResult] = []
        for a, b in self.chunks(encoded):
            # One result for the chunk, under its message id. The message's one argument, the
            # list of events, is joined from each event's JSON made above.
            chunk = Chunk(new_task_id(), app)
            args = b"[[" + b",".join(encoded[a:b]) + b"]]"
            envelopes.append(template.fill(chunk.id, args, f"[{b - a} events]"))
            handles.extend(ChunkHandle(chunk, i, ignored=ignored) for i in range(b - a))
        return envelopes, handles

    def chunks(self, encoded: list[bytes]) -> list[tuple[int, int]]:
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
            if i > start and (i - start >= size_cap or size + weight > limit):
                bounds.append((start, i))
                start, size = i, 0
            size += weight
        bounds.append((start, len(encoded)))
        return bounds


def argsrepr(payload: dict[str, Any]) -> str:
    """What task events (Flower) show instead of the arguments: never the raw user id."""
    return (
        f"[{{event_id: {payload['event_id']}, action_type: {payload['action_type']}, "
        f"model: {payload.get('model', 'default')}}}]"
    )


def validate_one(event: EventLike) -> InteractionData:
    """``event`` as the model; ``InvalidEventError`` naming each bad field."""
    if isinstance(event, InteractionData):
        return event
    try:
        return InteractionData.model_validate(event)
    except ValidationError as exc:
        raise InvalidEventError.from_validation_error(exc) from None


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


def event_json(event: EventLike) -> tuple[bytes, dict[str, Any]]:
    """One event validated, as the JSON ``train_step`` sends and the fields its ``argsrepr`` shows.

    Exactly ``InteractionData.model_dump(mode="json")`` (the contract's form of the
    ``itrain.train_step`` argument, which other services may read off the queue), serialised by
    pydantic in one call; an ``event_id`` is chosen here when missing, so a retry de-duplicates.
    """
    model = validate_one(_with_id(event))
    shown = {"event_id": model.event_id, "action_type": model.action_type, "model": model.model}
    return model.__pydantic_serializer__.to_json(model), shown


def payloads(events: list[EventLike]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The events of ``train_many`` validated (all or nothing), in order: as objects ready for
    JSON, and as each one's JSON (what ``Outgoing.chunks`` weighs them by).

    Plain dicts are checked against the model's field types without building a model
    (``check_dicts``) and go as the caller gave them, with an ``event_id`` added where missing:
    the chunk form is ours (README, "Enqueue from any language"), and the worker validates each
    event again with the same types. Anything else goes as ``model_dump(mode="json")``.
    """
    items = [_with_id(e) for e in events]
    try:
        if all(_as_is(e) for e in items):
            check_dicts(items)  # type: ignore[arg-type]
            try:
                return items, [orjson.dumps(e) for e in items]  # type: ignore[return-value]
            except TypeError:
                pass  # some value JSON cannot hold as is: the models' form for all
        dumped = EVENT_LIST.dump_python(EVENT_LIST.validate_python(items), mode="json")
    except ValidationError as exc:
        raise InvalidEventError.from_validation_error(exc) from None
    return dumped, [orjson.dumps(p) for p in dumped]
