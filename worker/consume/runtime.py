"""Per-process state and the function a pool process runs for a group of training messages.

``run_messages`` is the whole job of a pool process: decode every message, validate every event,
train the valid ones in one critical section per model, then write every event's result and
every dead letter. It returns a small summary per message for the main process, which acks the
messages and sends their task events (Flower).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from producer.errors import InvalidEventError
from producer.events import InteractionData
from producer.protocol import TASK_TRAIN_BATCH
from producer.redis_conn import connect
from producer.settings import Settings, get_settings
from worker.consume.messages import (
    RawMessage,
    decode_args,
    model_hint,
    split_batch,
    validate_event,
    validate_many,
)
from worker.engine.trainer import Job, Trainer, dead_letter_entry
from worker.store.model_store import Store
from worker.store.results import Outcome, write_results

__all__ = ["Runtime", "Summary", "get_runtime", "run_messages", "shown_args"]

logger = logging.getLogger("itrain.runtime")

#: (task id, state, result or error text, runtime in seconds, args to show), one per message. The
#: args are built by the worker from the validated event (never the message header's ``argsrepr``,
#: which any sender can set): Flower shows them, so they never hold the user id.
Summary = tuple[str, str, Any, float, str]


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


_runtime: tuple[int, Runtime] | None = None


def get_runtime() -> Runtime:
    """This process's runtime, made on first use (after a fork, the child makes its own)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        _runtime = (os.getpid(), Runtime(get_settings()))
    return _runtime[1]


def run_messages(messages: Sequence[RawMessage]) -> list[Summary]:
    rt = get_runtime()
    settings = rt.settings
    start = time.perf_counter()
    jobs: list[Job] = []
    owner: list[int] = []  # message index of each job
    failures: list[Outcome] = []
    dead: dict[str, list[bytes]] = {}
    message_error: dict[int, str] = {}
    invalid: dict[int, int] = {}

    for m, msg in enumerate(messages):
        try:
            args = decode_args(msg, settings.max_message_bytes)
            items = split_batch(args) if msg.task == TASK_TRAIN_BATCH else _single(msg, args)
        except InvalidEventError as exc:
            message_error[m] = _fail(failures, dead, msg.task_id, exc, exc.payload_hint)
            continue
        valid = validate_many([payload for _, payload in items])
        for (task_id, payload), event in zip(items, valid, strict=True):
            try:
                jobs.append(Job(task_id, event if event is not None else validate_event(payload)))
                owner.append(m)
            except InvalidEventError as exc:
                _fail(failures, dead, task_id, exc, payload)
                invalid[m] = invalid.get(m, 0) + 1
                if msg.task != TASK_TRAIN_BATCH:
                    message_error[m] = str(exc)

    outcomes = rt.trainer.train(jobs)
    # Dead letters first: whoever sees a FAILURE result also sees its dead letter.
    for model, entries in dead.items():
        rt.store.dead_letter(model, entries)
    write_results(rt.result_client, [*outcomes, *failures], settings.result_expires)

    per_message: dict[int, list[Outcome]] = {}
    shown: dict[int, str] = {}
    for m, outcome, job in zip(owner, outcomes, jobs, strict=True):
        per_message.setdefault(m, []).append(outcome)
        shown.setdefault(m, shown_args(job.event))
    runtime = time.perf_counter() - start
    summaries: list[Summary] = []
    for m, msg in enumerate(messages):
        if m in message_error:
            summaries.append((msg.task_id, "FAILURE", message_error[m], runtime, ""))
        elif msg.task == TASK_TRAIN_BATCH:
            counts = _count(per_message.get(m, []), invalid.get(m, 0))
            summaries.append((msg.task_id, "SUCCESS", counts, runtime, f"[{counts['events']} events]"))
        else:
            (o,) = per_message[m]
            state = o.status
            summaries.append(
                (
                    msg.task_id,
                    state,
                    o.result if state == "SUCCESS" else o.result["exc_message"][0],
                    runtime,
                    shown.get(m, ""),
                )
            )
    return summaries


def shown_args(event: InteractionData) -> str:
    """What Flower shows as a training task's args: ids and names, never the user id."""
    return f"[{{event_id: {event.event_id}, action_type: {event.action_type}, model: {event.model}}}]"


def _single(msg: RawMessage, args: list[Any]) -> list[tuple[str, Any]]:
    if len(args) != 1:
        raise InvalidEventError(f"{msg.task} takes exactly one argument, the event; got {len(args)}")
    return [(msg.task_id, args[0])]


def _fail(
    failures: list[Outcome],
    dead: dict[str, list[bytes]],
    task_id: str,
    exc: InvalidEventError,
    payload: Any,
) -> str:
    failures.append(Outcome.failure(task_id, exc))
    model = model_hint(payload)
    event_id = payload.get("event_id") if isinstance(payload, dict) else None
    extra = {"payload_kind": type(payload).__name__} if payload is not None else None
    dead.setdefault(model, []).append(
        dead_letter_entry(
            task_id,
            exc,
            model=model,
            event_id=event_id if isinstance(event_id, str) and len(event_id) <= 128 else None,
            extra=extra,
        )
    )
    logger.warning("task %s failed: %s", task_id, exc)
    return str(exc)


def _count(outcomes: list[Outcome], invalid: int) -> dict[str, int]:
    counts: dict[str, int] = {"events": len(outcomes) + invalid}
    if invalid:
        counts["failed"] = invalid
    for o in outcomes:
        key = o.result.get("status", "failed") if o.status == "SUCCESS" else "failed"
        counts[key] = counts.get(key, 0) + 1
    return counts
