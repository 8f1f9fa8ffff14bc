"""Per-process state and the function a pool process runs for a group of training messages.

``run_messages`` is the whole job of a pool process: decode every message, validate every event,
train the valid ones in one critical section per model, then write every event's result and
every dead letter. It returns a small summary per message for the main process, which acks the
messages and sends their task events (Flower).

Poison isolation: an error that belongs to an item (it cannot be decoded, it is invalid, it has no
target, its update is non-finite, or our code raises anything else for it) ends that item as
FAILURE with a dead letter, and the rest of its message still trains; the message is then acked,
never requeued, because it would fail the same way on every delivery. An error that belongs to
Redis (``faults.is_redis_fault``) propagates out of ``run_messages``: the main process puts the
messages back on the queue, and nothing is answered or dead-lettered for them.

With ``ITRAIN_MIN_REPLICAS``, a store or result backend that is not the broker's Redis is waited
on before the summaries go back (``worker.store.replicas``): the store's replicas before the
results are written (a caller never reads "trained" of a commit a failover could still lose), the
backend's after. Too few replicas in time is a Redis fault: the messages go back to the queue.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.chunks import handle_ids
from producer.errors import DeliveryLimitError, EventProcessingError, InvalidEventError
from producer.events import InteractionData
from producer.protocol import TASK_TRAIN_BATCH
from producer.redis_conn import connect
from producer.settings import Settings, get_settings
from worker.consume.faults import is_redis_fault
from worker.consume.messages import (
    RawMessage,
    check_task_id,
    decode_args,
    is_chunk,
    model_hint,
    plain_chunk,
    plain_ids,
    printable,
    read_chunk,
    split_batch,
    validate_event,
    validate_many,
)
from worker.engine.batch import Job
from worker.outcome import dead_letter_entry
from worker.store.model_store import Store
from worker.store.replicas import ReplicaBarrier
from worker.store.results import ChunkResult, Outcome, write_results
from worker.training.trainer import Trainer

__all__ = ["ErrorText", "Runtime", "Summary", "get_runtime", "run_messages", "shown_args"]

logger = logging.getLogger("itrain.runtime")

#: (task id, state, result or ``ErrorText``, runtime in seconds, args to show), one per message.
#: The args are built by the worker from the validated event (never the message header's
#: ``argsrepr``, which any sender can set): Flower shows them, so they never hold the user id.
Summary = tuple[str, str, Any, float, str]


class ErrorText(str):
    """A failed message's error text that also names the error's class (``exc_type``, in
    ``producer.errors``), so that a direct call of a task raises that class, not a guess."""

    exc_type: str

    def __new__(cls, text: str, exc_type: str = "InvalidEventError") -> ErrorText:
        self = super().__new__(cls, text)
        self.exc_type = exc_type
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Summaries cross from the pool process to the main one pickled.
        return (ErrorText, (str(self), self.exc_type))


class Runtime:
    """The Redis clients, store and trainer of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store_client = connect(settings.store, settings.publish_timeout)
        self.result_client = (
            self.store_client
            if settings.backend == settings.store
            else connect(settings.backend, settings.publish_timeout)
        )
        self.store = Store(self.store_client, settings)
        self.trainer = Trainer(self.store, settings)
        # None where nothing waits (no replicas wanted, or the broker's own Redis).
        self.store_barrier = ReplicaBarrier.of(self.store_client, settings, settings.store)
        self.results_barrier = ReplicaBarrier.of(self.result_client, settings, settings.backend)


_runtime: tuple[int, Runtime] | None = None


def get_runtime() -> Runtime:
    """This process's runtime, made on first use (after a fork, the child makes its own)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        _runtime = (os.getpid(), Runtime(get_settings()))
    return _runtime[1]


@dataclass
class _Plan:
    """What one call of ``run_messages`` decided, message by message and job by job."""

    jobs: list[Job] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # message index of each job
    #: Jobs of messages delivered more often than ITRAIN_MAX_DELIVERIES: answered, not trained.
    late: list[Job] = field(default_factory=list)
    late_owner: list[int] = field(default_factory=list)
    #: Results of items that ended before training, and the message each belongs to.
    failures: list[Outcome] = field(default_factory=list)
    failure_owner: list[int] = field(default_factory=list)
    dead: dict[str, list[bytes]] = field(default_factory=dict)  # model -> dead letters
    message_error: dict[int, str] = field(default_factory=dict)  # message refused whole
    #: Messages in the chunk form (one result for all their events), and their event counts.
    chunks: dict[int, int] = field(default_factory=dict)
    invalid: dict[int, int] = field(default_factory=dict)  # items failed before training

    def dead_letter(self, model: str, entry: bytes) -> None:
        self.dead.setdefault(model, []).append(entry)


def run_messages(messages: Sequence[RawMessage]) -> list[Summary]:
    """Train a group of messages; one summary per message, in order.

    Raises only when Redis fails (``is_redis_fault``): then nothing of this group is acked, and
    events already committed come back as ``duplicate`` on the redelivery.
    """
    rt = get_runtime()
    start = time.perf_counter()
    plan = _Plan()
    for m, msg in enumerate(messages):
        _admit(plan, m, msg, rt.settings)

    outcomes: list[Outcome] = []
    owners: list[int] = []
    by_model: dict[str, list[int]] = {}
    for i, job in enumerate(plan.jobs):
        by_model.setdefault(job.event.model, []).append(i)
    for idxs in by_model.values():
        # One model at a time, so an error raised for one event never undoes another model's commit.
        outcomes.extend(_train_isolated(rt.trainer, [plan.jobs[i] for i in idxs], plan))
        owners.extend(plan.owner[i] for i in idxs)
    if plan.late:
        deliveries = [messages[m].deliveries for m in plan.late_owner]
        outcomes.extend(_answer_late(rt.store, plan, deliveries, rt.settings.max_deliveries))
        owners.extend(plan.late_owner)

    # Dead letters first: whoever sees a FAILURE result also sees its dead letter.
    for model, entries in plan.dead.items():
        rt.store.dead_letter(model, entries)
    if rt.store_barrier is not None:
        rt.store_barrier.cross([j.event.event_id for j in plan.jobs], "commit")
    write_results(rt.result_client, _wanted(messages, plan, outcomes, owners), rt.settings.result_expires)
    if rt.results_barrier is not None:
        rt.results_barrier.cross([j.event.event_id for j in plan.jobs], "results")
    return _summaries(messages, plan, outcomes, owners, time.perf_counter() - start)


def _wanted(
    messages: Sequence[RawMessage], plan: _Plan, outcomes: list[Outcome], owners: list[int]
) -> list[Outcome | ChunkResult]:
    """The results to write: one per event, and one per message in the chunk form; none for
    messages sent with Celery's ``ignore_result`` (fire-and-forget), whose events are trained and
    dead-lettered as any other's, and whose task events (Flower) are still sent."""
    ignored = {m for m, msg in enumerate(messages) if msg.ignore_result}
    if not ignored and not plan.chunks:
        return [*outcomes, *plan.failures]
    wanted: list[Outcome | ChunkResult] = []
    of_chunk: dict[int, list[Outcome]] = {m: [] for m in plan.chunks}
    pairs = zip([*outcomes, *plan.failures], [*owners, *plan.failure_owner], strict=True)
    for o, m in pairs:
        if m in ignored:
            continue
        if m in of_chunk:
            of_chunk[m].append(o)
        else:
            wanted.append(o)
    for m, size in plan.chunks.items():
        if m not in ignored and m not in plan.message_error:
            wanted.append(ChunkResult(messages[m].task_id, size, of_chunk[m]))
    return wanted


# -- admission: decode, check ids, validate ------------------------------------------------------


def _admit(plan: _Plan, m: int, msg: RawMessage, settings: Settings) -> None:
    """Decode one message and validate its items: each becomes a job or a failure."""
    try:
        check_task_id(msg.task_id)
    except InvalidEventError as exc:
        _refuse(plan, m, msg, exc, settings)
        return
    late = msg.deliveries > settings.max_deliveries
    if msg.task == TASK_TRAIN_BATCH:
        # A chunk whose every event is valid (the common case) is read in one call.
        events = read_chunk(msg, settings.max_message_bytes)
        if events is not None and plain_chunk(msg.task_id, len(events)):
            plan.chunks[m] = len(events)
            ids = handle_ids(msg.task_id, len(events))
            _add(plan, m, list(map(Job._make, zip(ids, events, strict=True))), late)
            return
    try:
        args = decode_args(msg, settings.max_message_bytes)
        items = split_batch(args, msg.task_id) if msg.task == TASK_TRAIN_BATCH else _single(msg, args)
    except Exception as exc:
        error = _item_error(exc)
        plan.message_error[m] = _fail(plan, m, msg.task_id, error, getattr(error, "payload_hint", None))
        return
    if msg.task == TASK_TRAIN_BATCH and is_chunk(args):
        plan.chunks[m] = len(items)

    batch = msg.task == TASK_TRAIN_BATCH
    try:
        valid = validate_many([payload for _, payload in items])
    except Exception as exc:  # validate_many falls back on its own; this is a bug's safety net
        _item_error(exc)
        valid = [None] * len(items)
    ids = [task_id for task_id, _ in items]
    if not any(event is None for event in valid) and (not batch or plain_ids(ids)):
        # Every item valid: all become jobs, in order, without a check each.
        jobs = [Job(task_id, event) for task_id, event in zip(ids, valid, strict=True) if event is not None]
        _add(plan, m, jobs, late)
        return
    for (task_id, payload), event in zip(items, valid, strict=True):
        try:
            if batch:
                check_task_id(task_id, "itrain.train_batch id")
        except InvalidEventError as exc:
            plan.invalid[m] = plan.invalid.get(m, 0) + 1
            plan.dead_letter(model_hint(payload), _entry(task_id, exc, payload))
            logger.warning("event of task %s refused: %s", printable(task_id), exc)
            continue
        try:
            job = Job(task_id, event if event is not None else validate_event(payload))
        except Exception as exc:
            error = _item_error(exc)
            plan.invalid[m] = plan.invalid.get(m, 0) + 1
            text = _fail(plan, m, task_id, error, payload)
            if not batch:
                plan.message_error[m] = text
            continue
        (plan.late if late else plan.jobs).append(job)
        (plan.late_owner if late else plan.owner).append(m)


def _add(plan: _Plan, m: int, jobs: list[Job], late: bool) -> None:
    """Jobs of message ``m``, to train, or to answer without training when it came too often."""
    (plan.late if late else plan.jobs).extend(jobs)
    (plan.late_owner if late else plan.owner).extend([m] * len(jobs))


def _refuse(plan: _Plan, m: int, msg: RawMessage, exc: InvalidEventError, settings: Settings) -> None:
    """A message whose task id is not valid text: there is no id to answer under, so no result at
    all. Nothing of it is trained; a dead letter for each event that can be read (in its model's
    list), or one for the message, and a log line say what came."""
    plan.message_error[m] = str(exc)
    logger.warning("message of task %s refused: %s", printable(msg.task_id), exc)
    try:
        args = decode_args(msg, settings.max_message_bytes)
        pairs = split_batch(args, msg.task_id) if msg.task == TASK_TRAIN_BATCH else _single(msg, args)
        payloads = [p for _, p in pairs]
    except Exception as unreadable:
        if is_redis_fault(unreadable):
            raise
        payloads = [None]
    for payload in payloads:
        plan.dead_letter(model_hint(payload), _entry(msg.task_id, exc, payload))


def _single(msg: RawMessage, args: list[Any]) -> list[tuple[Any, Any]]:
    if len(args) != 1:
        raise InvalidEventError(f"{msg.task} takes exactly one argument, the event; got {len(args)}")
    return [(msg.task_id, args[0])]


def _item_error(exc: Exception) -> InvalidEventError:
    """``exc`` as the item's error; re-raises it when it is Redis's."""
    if is_redis_fault(exc):
        raise exc
    if isinstance(exc, InvalidEventError):
        return exc
    # Decoding and validation touch no shared state: whatever else they raise is this input's.
    logger.exception("unexpected error while reading an event")
    error = InvalidEventError(f"event could not be read: {type(exc).__name__}: {exc}")
    error.payload_hint = getattr(exc, "payload_hint", None)
    return error


def _fail(plan: _Plan, m: int, task_id: str, exc: Exception, payload: Any) -> str:
    """A FAILURE result under ``task_id`` and a dead letter, for an item of message ``m`` that
    never became a job."""
    event_id = _event_id_hint(payload)
    plan.failures.append(Outcome.failure(task_id, exc, event_id=event_id))
    plan.failure_owner.append(m)
    plan.dead_letter(model_hint(payload), _entry(task_id, exc, payload))
    logger.warning("task %s failed: %s", task_id, exc)
    return str(exc)


def _entry(task_id: Any, exc: BaseException, payload: Any) -> bytes:
    extra = {"payload_kind": type(payload).__name__} if payload is not None else None
    return dead_letter_entry(
        printable(task_id), exc, model=model_hint(payload), event_id=_event_id_hint(payload), extra=extra
    )


def _event_id_hint(payload: Any) -> str | None:
    event_id = payload.get("event_id") if isinstance(payload, dict) else None
    if isinstance(event_id, str) and 0 < len(event_id) <= 128:
        return printable(event_id)
    return None


# -- training, one model at a time ---------------------------------------------------------------


def _train_isolated(trainer: Trainer, jobs: list[Job], plan: _Plan) -> list[Outcome]:
    """``trainer.train(jobs)``; when it raises for a reason that is not Redis's, the jobs are
    trained again in halves until the event that raises is alone, and only that one fails.

    A half that trained is committed; it is not tried again. Events of a half that raised were not
    committed (the trainer raises before its commit, or the retry answers them ``duplicate``).
    """
    try:
        return trainer.train(jobs)
    except Exception as exc:
        if is_redis_fault(exc):
            raise
        if len(jobs) > 1:
            half = len(jobs) // 2
            return _train_isolated(trainer, jobs[:half], plan) + _train_isolated(trainer, jobs[half:], plan)
        (job,) = jobs
        logger.exception("task %s: training its event raised", job.task_id)
        error = EventProcessingError(f"training this event raised {type(exc).__name__}: {exc}")
        ev = job.event
        plan.dead_letter(
            ev.model,
            dead_letter_entry(
                job.task_id, error, model=ev.model, event_id=ev.event_id, action_type=ev.action_type
            ),
        )
        return [Outcome.failure(job.task_id, error, event_id=ev.event_id)]


def _answer_late(store: Store, plan: _Plan, deliveries: list[int], max_deliveries: int) -> list[Outcome]:
    """Jobs of a message delivered more than ``max_deliveries`` times: not trained. An event already
    in the weights answers ``duplicate``; the others end as FAILURE with a dead letter each."""
    jobs = plan.late
    outcomes: list[Outcome | None] = [None] * len(jobs)
    by_model: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_model.setdefault(job.event.model, []).append(i)
    for model, idxs in by_model.items():
        done = store.read(model, None, [jobs[i].event.event_id for i in idxs]).done
        for i, trained in zip(idxs, done, strict=True):
            job, ev = jobs[i], jobs[i].event
            if trained:
                outcomes[i] = Outcome.duplicate(job.task_id, model, ev.event_id)
                continue
            error = DeliveryLimitError(
                f"message delivered {deliveries[i]} times, more than ITRAIN_MAX_DELIVERIES="
                f"{max_deliveries}: its event was not trained"
            )
            outcomes[i] = Outcome.failure(job.task_id, error, event_id=ev.event_id)
            plan.dead_letter(
                model,
                dead_letter_entry(
                    job.task_id, error, model=model, event_id=ev.event_id, action_type=ev.action_type
                ),
            )
            logger.warning("task %s: %s", job.task_id, error)
    return [o for o in outcomes if o is not None]


# -- summaries -----------------------------------------------------------------------------------


def _summaries(
    messages: Sequence[RawMessage], plan: _Plan, outcomes: list[Outcome], owners: list[int], runtime: float
) -> list[Summary]:
    per_message: dict[int, list[Outcome]] = {}
    for m, outcome in zip(owners, outcomes, strict=True):
        per_message.setdefault(m, []).append(outcome)
    shown: dict[int, str] = {}
    for m, job in zip([*plan.owner, *plan.late_owner], [*plan.jobs, *plan.late], strict=True):
        if m not in shown:
            shown[m] = shown_args(job.event)
    # A message refused before training failed as its item did (an InvalidEventError, by the
    # admission's rules), or with no result at all (a task id that is not text).
    refused = {m: o.result["exc_type"] for o, m in zip(plan.failures, plan.failure_owner, strict=True)}
    summaries: list[Summary] = []
    for m, msg in enumerate(messages):
        if m in plan.message_error:
            error = ErrorText(plan.message_error[m], refused.get(m, "InvalidEventError"))
            summaries.append((msg.task_id, "FAILURE", error, runtime, ""))
        elif msg.task == TASK_TRAIN_BATCH:
            counts = _count(per_message.get(m, []), plan.invalid.get(m, 0))
            summaries.append((msg.task_id, "SUCCESS", counts, runtime, f"[{counts['events']} events]"))
        else:
            (o,) = per_message[m]
            result = (
                o.result
                if o.status == "SUCCESS"
                else ErrorText(o.result["exc_message"][0], o.result["exc_type"])
            )
            summaries.append((msg.task_id, o.status, result, runtime, shown.get(m, "")))
    return summaries


def shown_args(event: InteractionData) -> str:
    """What Flower shows as a training task's args: ids and names, never the user id."""
    return f"[{{event_id: {event.event_id}, action_type: {event.action_type}, model: {event.model}}}]"


def _count(outcomes: list[Outcome], invalid: int) -> dict[str, int]:
    counts: dict[str, int] = {"events": len(outcomes) + invalid}
    if invalid:
        counts["failed"] = invalid
    for o in outcomes:
        key = o.result.get("status", "failed") if o.status == "SUCCESS" else "failed"
        counts[key] = counts.get(key, 0) + 1
    return counts
