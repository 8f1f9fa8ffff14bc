"""Decoding task messages by hand, so that a hostile one becomes a clear error, never code.

The worker reads each training message's body itself instead of letting Celery decode it: the
content type must be JSON (a pickle message is refused unread), the size is bounded before
parsing, and every way a body can be wrong ends as an ``InvalidEventError`` naming the problem.

Task ids are checked here too: an id becomes a Redis key and a JSON string, so it must be text
UTF-8 can encode (a JSON ``\\ud800`` escape yields a Python string that it cannot).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from producer.chunks import handle_id, handle_ids
from producer.errors import InvalidEventError
from producer.events import EVENT_LIST, InteractionData, describe_validation_error

__all__ = [
    "MAX_BATCH_EVENTS",
    "TASK_ID_MAX",
    "RawMessage",
    "check_headers",
    "check_task_id",
    "plain_ids",
    "decode_args",
    "is_chunk",
    "model_hint",
    "plain_chunk",
    "printable",
    "read_chunk",
    "read_step",
    "split_batch",
    "validate_event",
    "validate_many",
]

_JSON = "application/json"
MAX_BATCH_EVENTS = 10_000
#: Longest task id accepted (Celery's are 36-character UUIDs).
TASK_ID_MAX = 255


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A task message as it arrived; plain data, so it can cross into a pool process."""

    task: str
    task_id: str
    content_type: str | None
    content_encoding: str | None
    compression: str | None
    body: bytes
    #: How many deliveries of this message counted, this one included (1 = first delivery): a
    #: give-back by a live worker does not count (``redelivery``). Our transport counts them in
    #: Redis (``delivery_info["deliveries"]``).
    deliveries: int = 1
    #: Celery's ``ignore_result`` header (fire-and-forget): train, dead-letter failures, but
    #: write no result for any of the message's events.
    ignore_result: bool = False
    #: When the transport first took the message off the queue (unix seconds), however often it
    #: was given back since; None when the transport does not say. Sets its age
    #: (``redelivery.refusal``).
    first_taken: float | None = None
    #: The message's format version, from its ``itrain_format`` header (``producer.formats``).
    message_format: int = 1
    #: When it was enqueued (unix seconds): its ``itrain_enqueued_at`` header
    #: (``producer.enqueue_time``), else when the transport first took it, else when this worker
    #: received it; None when nobody said (a direct call): counted from when it is trained.
    enqueued_at: float | None = None


def decode_args(msg: RawMessage, max_bytes: int) -> list[Any]:
    """The positional arguments of a Celery protocol 2 message."""
    check_headers(msg, max_bytes)
    try:
        body = orjson.loads(msg.body)
    except orjson.JSONDecodeError as exc:
        body = _strict_fallback(msg.body, exc)
    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[0], list)):
        raise InvalidEventError(
            f"message body must be [args, kwargs, embed] (Celery protocol 2), got {type(body).__name__}"
        )
    if body[1]:
        raise InvalidEventError(f"task {msg.task} takes no keyword arguments")
    args: list[Any] = body[0]
    return args


def check_headers(msg: RawMessage, max_bytes: int) -> None:
    """``InvalidEventError`` unless the message is uncompressed UTF-8 JSON of at most
    ``max_bytes`` (checked before its body is read)."""
    if msg.content_type != _JSON:
        raise InvalidEventError(
            f"content type {msg.content_type!r} refused: only {_JSON} is accepted (never pickle)"
        )
    if msg.compression:
        raise InvalidEventError(f"compressed messages ({msg.compression!r}) are refused")
    if msg.content_encoding not in (None, "utf-8", "utf8", "binary"):
        raise InvalidEventError(f"content encoding {msg.content_encoding!r} refused: expected utf-8")
    if len(msg.body) > max_bytes:
        raise InvalidEventError(
            f"message body is {len(msg.body)} bytes, larger than ITRAIN_MAX_MESSAGE_BYTES={max_bytes}"
        )


#: The body of an ``itrain.train_batch`` message in the chunk form as our producer sends it:
#: ``[[events], {}, {"callbacks": null, ...}]``.
_CHUNK_BODY: TypeAdapter[tuple[tuple[list[InteractionData]], dict[str, Any], dict[str, None]]] = TypeAdapter(
    tuple[tuple[list[InteractionData]], Annotated[dict[str, Any], Field(max_length=0)], dict[str, None]]
)


def read_chunk(msg: RawMessage, max_bytes: int) -> list[InteractionData] | None:
    """The events of an ``itrain.train_batch`` message in the chunk form, when the message and
    every event in it are valid (the common case); ``None`` otherwise.

    One pydantic call reads and validates the body straight from its bytes, with the same event
    model: no JSON objects are built and then validated apart (a third less CPU than
    ``decode_args`` and ``validate_many``). It accepts only what that way accepts, with the same
    events: any NaN or infinity fails a field (the other way refuses the body whole), and a body
    orjson refuses (lone surrogates, bytes that are not UTF-8) fails here too. A message that is
    not accepted takes the item-by-item way, which names each problem.
    """
    try:
        check_headers(msg, max_bytes)
        (events,), _, _ = _CHUNK_BODY.validate_json(msg.body)
    except (InvalidEventError, ValidationError):
        return None
    if not 0 < len(events) <= MAX_BATCH_EVENTS:
        return None
    return events


#: The body of an ``itrain.train_step`` message: ``[[event], {}, {...}]``.
_STEP_BODY: TypeAdapter[tuple[tuple[InteractionData], dict[str, Any], Any]] = TypeAdapter(
    tuple[tuple[InteractionData], Annotated[dict[str, Any], Field(max_length=0)], Any]
)


def read_step(msg: RawMessage, max_bytes: int) -> InteractionData | None:
    """The event of an ``itrain.train_step`` message when the message and its event are valid
    (the common case); ``None`` otherwise. As ``read_chunk``: one pydantic call from the body's
    bytes, accepting only what the item-by-item way accepts; anything else takes that way, which
    names the problem."""
    try:
        check_headers(msg, max_bytes)
        (event,), _, _ = _STEP_BODY.validate_json(msg.body)
    except (InvalidEventError, ValidationError):
        return None
    return event


def _strict_fallback(body: bytes, exc: orjson.JSONDecodeError) -> Any:
    """A body orjson refused, read by Python's parser when that is still JSON.

    orjson refuses lone surrogate escapes (``"\\ud800"``), which JSON's grammar allows (and
    surrogates encoded as bytes, which Python reads back the same way): read such a body anyway,
    so that only the items holding them fail (each is checked as a task id or an event) and their
    neighbours train. Python's parser also accepts NaN and Infinity, which JSON
    does not: those bodies are refused, keeping the event to route the dead letter.
    """
    constants: list[str] = []

    def non_finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # NaN, Infinity, or a number like 1e400
            constants.append(text)
        return value

    try:
        loose = json.loads(body, parse_constant=non_finite, parse_float=non_finite)
    except (ValueError, RecursionError):  # UnicodeDecodeError (other bytes not UTF-8) is one too
        raise InvalidEventError(f"message body is not valid JSON: {exc}") from None
    if not constants:
        return loose
    error = InvalidEventError(
        "message body holds NaN or an infinity, which JSON does not allow: non-finite numbers are refused"
    )
    if isinstance(loose, list) and loose and isinstance(loose[0], list) and loose[0]:
        error.payload_hint = loose[0][0]
    raise error


def validate_event(payload: Any) -> InteractionData:
    """One event from its JSON object; ``InvalidEventError`` names each bad field."""
    if not isinstance(payload, dict):
        raise InvalidEventError(f"event must be a JSON object, got {type(payload).__name__}")
    try:
        return InteractionData.model_validate(payload)
    except ValidationError as exc:
        raise InvalidEventError(f"invalid event: {describe_validation_error(exc)}") from None


def validate_many(payloads: list[Any]) -> list[InteractionData | None]:
    """All events in one pydantic call when all are valid (the common case, several times faster
    than one call each); otherwise ``None`` for every one, to be validated one by one."""
    if len(payloads) > 1 and all(isinstance(p, dict) for p in payloads):
        try:
            return list(EVENT_LIST.validate_python(payloads))
        except ValidationError:
            pass
    return [None] * len(payloads)


def split_batch(args: list[Any], task_id: str) -> list[tuple[Any, Any]]:
    """``itrain.train_batch`` arguments as (result id, event) pairs.

    Two forms: ``[events]``, a chunk with one result under the message's id (``task_id``), whose
    events answer as ``<task id>:<index>`` (``producer.chunks``); and ``[ids, events]``, each
    event with a result of its own under its id. The ids are not checked here:
    ``check_task_id`` refuses a bad one item by item, so that its neighbours still train.
    """
    if is_chunk(args):
        (events,) = args
        _check_batch_size(len(events))
        return list(zip(handle_ids(task_id, len(events)), events, strict=True))
    if len(args) != 2 or not isinstance(args[0], list) or not isinstance(args[1], list):
        raise InvalidEventError(
            "itrain.train_batch takes a list of events, or a list of ids and a list of events"
        )
    ids, events = args
    if len(ids) != len(events):
        raise InvalidEventError(f"itrain.train_batch got {len(ids)} ids for {len(events)} events")
    _check_batch_size(len(ids))
    return list(zip(ids, events, strict=True))


def is_chunk(args: list[Any]) -> bool:
    """Whether ``itrain.train_batch`` arguments are the chunk form, ``[events]``."""
    return len(args) == 1 and isinstance(args[0], list)


def _check_batch_size(n: int) -> None:
    if n > MAX_BATCH_EVENTS:
        raise InvalidEventError(f"itrain.train_batch carries at most {MAX_BATCH_EVENTS} events, got {n}")


def check_task_id(value: Any, what: str = "task id") -> str:
    """``value`` if it can name a result: a string of 1 to 255 characters that UTF-8 can encode.

    Raises ``InvalidEventError`` naming ``what`` otherwise (the id is never repeated: it may be
    huge or not printable).
    """
    if not isinstance(value, str):
        raise InvalidEventError(
            f"{what} must be a string of 1 to {TASK_ID_MAX} characters, got {type(value).__name__}"
        )
    if not 0 < len(value) <= TASK_ID_MAX:
        raise InvalidEventError(f"{what} must be a string of 1 to {TASK_ID_MAX} characters, got {len(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEventError(
                f"{what} is not valid text: it holds a lone surrogate (a JSON \\ud800-style escape), "
                "which UTF-8 cannot encode"
            ) from None
    return value


def plain_chunk(task_id: str, n: int) -> bool:
    """Whether ``plain_ids`` accepts the ids of all ``n`` events of chunk ``task_id``, a valid task
    id (``check_task_id``): they differ only in their index, so the last is the longest."""
    return task_id.isascii() and len(handle_id(task_id, n - 1)) <= TASK_ID_MAX


def plain_ids(values: list[Any]) -> bool:
    """Whether every value is an ASCII string of 1 to ``TASK_ID_MAX`` characters: ids that
    ``check_task_id`` accepts (the common case, checked in one pass)."""
    return all(type(v) is str and 0 < len(v) <= TASK_ID_MAX and v.isascii() for v in values)


def printable(value: Any, limit: int = 300) -> str:
    """A form of a (possibly invalid) id that logs and JSON can always hold: a string cut at
    ``limit`` characters with lone surrogates escaped, anything else as ``<type>``."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def model_hint(payload: Any) -> str:
    """The model a (possibly invalid) payload names, for routing its dead letter."""
    model = payload.get("model") if isinstance(payload, dict) else None
    if isinstance(model, str) and 0 < len(model) <= 64:
        return model
    return "default"
