"""Admission: one pass that turns a task message into what the runtime routes.

A message comes out of ``admit`` as an ``Admission``: its valid events as jobs (each with the
result id it owes), its refused items (an error, the result id it answers under, whether it can
answer at all, and what could be read of it to route its dead letter), whether it is a chunk
(one result for all its events) and, when it failed whole, the error its summary shows. Every
way of reading a message (the one-call chunk path, decoding, splitting a batch, checking ids,
validating) is tried here once, in order; the runtime and the culprit's dead letter only route
what comes out.

What fails where (the rules the README's "Poison messages" table states):

* a header task id that cannot name a result: the whole message is refused, nothing answered (no
  id to answer under), a dead letter per readable event;
* a body that does not decode, or a ``train_step`` whose one event is invalid: the message fails
  whole, FAILURE under its task id;
* in a ``train_batch``, an id that cannot name a result: that event alone, with a dead letter
  and no result; an invalid event: that event alone, FAILURE under its id.

A Redis fault cannot arise here (nothing here talks to Redis); any other unforeseen error is
taken as the input's (``InvalidEventError`` naming it), never raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from producer.chunks import handle_ids
from producer.errors import InvalidEventError
from producer.protocol import TASK_TRAIN_BATCH
from worker.consume.faults import is_redis_fault
from worker.consume.message_format import refused_format
from worker.consume.messages import (
    RawMessage,
    check_task_id,
    decode_args,
    is_chunk,
    plain_chunk,
    plain_ids,
    printable,
    read_chunk,
    read_step,
    split_batch,
    validate_event,
    validate_many,
)
from worker.engine.batch import Job

__all__ = ["Admission", "Refused", "admit"]

logger = logging.getLogger("itrain.admission")


@dataclass(frozen=True, slots=True)
class Refused:
    """An item that will not be trained: its error, and where its answer and dead letter go."""

    #: The result id the item answers under (possibly not valid text when ``answer`` is False).
    task_id: Any
    error: Exception
    #: What could be read of the item (its event object, or None): routes its dead letter.
    payload: Any = None
    #: Whether a FAILURE result is written under ``task_id`` (False: an id that cannot name one).
    answer: bool = True


@dataclass(slots=True)
class Admission:
    """What one message holds, read once."""

    jobs: list[Job] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    #: The chunk form (one result for all its events, under the message's id): its event count.
    chunk: int | None = None
    #: The message failed whole: the error text its summary shows.
    error: str | None = None
    #: Every item of it, trained or not (a ``train_batch``'s count in its summary).
    events: int = 0


def admit(msg: RawMessage, max_bytes: int) -> Admission:
    """Read ``msg`` once: its jobs, its refused items, its form."""
    try:
        check_task_id(msg.task_id)
    except InvalidEventError as exc:
        return _refuse_whole(msg, exc, max_bytes)
    refused = refused_format(msg, max_bytes)
    if refused is not None:  # a format newer than this worker reads: answered, not trained
        too_new, payload = refused
        return Admission(refused=[Refused(msg.task_id, too_new, payload)], error=str(too_new), events=1)
    batch = msg.task == TASK_TRAIN_BATCH
    if not batch:
        # A valid event (the common case) is read in one call.
        event = read_step(msg, max_bytes)
        if event is not None:
            return Admission([Job(msg.task_id, event, msg.enqueued_at)], events=1)
    else:
        # A chunk whose every event is valid (the common case) is read in one call.
        events = read_chunk(msg, max_bytes)
        if events is not None and plain_chunk(msg.task_id, len(events)):
            ids = handle_ids(msg.task_id, len(events))
            jobs = list(map(Job._make, zip(ids, events, repeat(msg.enqueued_at))))
            return Admission(jobs, chunk=len(events), events=len(events))
    try:
        args = decode_args(msg, max_bytes)
        pairs = split_batch(args, msg.task_id) if batch else _single(msg, args)
    except Exception as exc:
        error = _as_item_error(exc)
        failed = Refused(msg.task_id, error, getattr(error, "payload_hint", None))
        return Admission(refused=[failed], error=str(error), events=1)
    admission = Admission(chunk=len(pairs) if batch and is_chunk(args) else None, events=len(pairs))
    try:
        valid = validate_many([payload for _, payload in pairs])
    except Exception as exc:  # validate_many falls back on its own; this is a bug's safety net
        _as_item_error(exc)
        valid = [None] * len(pairs)
    ids = [task_id for task_id, _ in pairs]
    if not any(event is None for event in valid) and (not batch or plain_ids(ids)):
        # Every item valid: all become jobs, in order, without a check each.
        enqueued = msg.enqueued_at
        admission.jobs = [
            Job(task_id, event, enqueued)
            for task_id, event in zip(ids, valid, strict=True)
            if event is not None
        ]
        return admission
    for (task_id, payload), event in zip(pairs, valid, strict=True):
        if batch:
            try:
                check_task_id(task_id, "itrain.train_batch id")
            except InvalidEventError as exc:
                admission.refused.append(Refused(task_id, exc, payload, answer=False))
                logger.warning("event of task %s refused: %s", printable(task_id), exc)
                continue
        try:
            event = event if event is not None else validate_event(payload)
            admission.jobs.append(Job(task_id, event, msg.enqueued_at))
        except Exception as exc:
            error = _as_item_error(exc)
            admission.refused.append(Refused(task_id, error, payload))
            if not batch:
                admission.error = str(error)
    return admission


def _refuse_whole(msg: RawMessage, exc: InvalidEventError, max_bytes: int) -> Admission:
    """A message whose task id is not valid text: there is no id to answer under, so no result
    at all. Nothing of it is trained; a dead letter for each event that can be read (in its
    model's list), or one for the message, and a log line say what came."""
    logger.warning("message of task %s refused: %s", printable(msg.task_id), exc)
    try:
        args = decode_args(msg, max_bytes)
        pairs = split_batch(args, msg.task_id) if msg.task == TASK_TRAIN_BATCH else _single(msg, args)
        payloads = [payload for _, payload in pairs]
    except Exception as unreadable:
        _as_item_error(unreadable, quiet=True)
        payloads = [None]
    refused = [Refused(msg.task_id, exc, payload, answer=False) for payload in payloads]
    return Admission(refused=refused, error=str(exc), events=len(refused))


def _single(msg: RawMessage, args: list[Any]) -> list[tuple[Any, Any]]:
    if len(args) != 1:
        raise InvalidEventError(f"{msg.task} takes exactly one argument, the event; got {len(args)}")
    return [(msg.task_id, args[0])]


def _as_item_error(exc: Exception, *, quiet: bool = False) -> InvalidEventError:
    """``exc`` as the item's error. Decoding and validation touch no shared state, so whatever
    they raise is the input's; a Redis fault here would be a bug, and is re-raised."""
    if is_redis_fault(exc):
        raise exc
    if isinstance(exc, InvalidEventError):
        return exc
    if not quiet:
        logger.exception("unexpected error while reading an event")
    error = InvalidEventError(f"event could not be read: {type(exc).__name__}: {exc}")
    error.payload_hint = getattr(exc, "payload_hint", None)
    return error
