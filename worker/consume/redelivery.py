"""When a message goes back to the queue, and when it stops coming back: the one owner of that policy.

A delivery of a message ends in one of three ways, and only one of them counts against
``ITRAIN_MAX_DELIVERIES``:

* **a verdict**: every event of it trained, answered ``duplicate`` or failed with a dead letter;
  the message is acknowledged and gone;
* **no verdict, and nobody left to give it back**: its pool process died (each of its messages is
  then run again alone, see ``after_job_failure``) or its whole worker died, and the message comes
  back after ``ITRAIN_VISIBILITY_TIMEOUT`` (``lua/restore.lua``'s sweep). That delivery counts: a
  message that keeps killing what runs it must stop coming back;
* **a give-back by a live worker**: a Redis fault under its job (``is_redis_fault``: READONLY,
  OOM, LOADING, MISCONF, a reset, ...), a warm shutdown, a lost connection, a fetch whose reply was
  never read. That was not the message's doing: the script that pushes it back also takes its
  delivery count back (``lua/restore.lua``, ``lua/giveback.lua``), in one atomic step. A fault of
  any length therefore dead-letters nothing (before, five requeues at 0.5, 1, 2, 4 and 8 s
  dead-lettered a valid event as ``DeliveryLimitError`` after a 41 s READONLY spell).

Exactly-once needs more than a count: a redelivered event is recognised by its marker, which lives
``ITRAIN_DEDUPE_TTL`` from the commit that wrote it, and a commit comes at most
``ITRAIN_VISIBILITY_TIMEOUT`` after its delivery was taken. So a message is no longer trained once
it is older than ``ITRAIN_DEDUPE_TTL - ITRAIN_VISIBILITY_TIMEOUT`` (``Settings.expire_after``),
counted from when the transport first took it (kept in Redis until its ack, however often it was
given back): a message still coming back then is answered ``DeliveryExpiredError`` with a dead
letter, never trained where a marker could no longer stop a second training.

At admission (``refusal``) a message over either limit is answered without training
(``answer_refused``): events already in the weights say ``duplicate``, the others fail with the
error and a dead letter each.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from typing import Any

from producer.errors import DeliveryExpiredError, DeliveryLimitError
from producer.settings import Settings
from worker.consume.faults import is_redis_fault
from worker.engine.batch import Job
from worker.outcome import dead_letter_entry
from worker.store.markers import own_trained
from worker.store.model_store import Store
from worker.store.results import Outcome

__all__ = [
    "REQUEUE_FIRST_SECONDS",
    "Backoff",
    "JobAction",
    "after_job_failure",
    "answer_refused",
    "delivery_count",
    "first_taken",
    "refusal",
]

#: Wait before the first give-back after a Redis fault; doubles with each consecutive fault, up
#: to ``Settings.requeue_ceiling`` (``ITRAIN_REQUEUE_BACKOFF_MAX``, at most half the visibility
#: timeout). Never at once: an instant requeue would loop as fast as Redis fails.
REQUEUE_FIRST_SECONDS = 0.5


def delivery_count(delivery_info: Mapping[str, Any]) -> int:
    """How many deliveries of the message counted, this one included.

    Our transport counts them in Redis (``deliveries``); any other transport only says whether
    the message was delivered before (``redelivered``). A value that is not a positive integer
    (a hostile envelope) counts as absent.
    """
    count = delivery_info.get("deliveries")
    if type(count) is int and count >= 1:  # not bool, not a float, not a string
        return count
    return 2 if delivery_info.get("redelivered") else 1


def first_taken(delivery_info: Mapping[str, Any]) -> float | None:
    """When the transport first took the message off the queue (unix seconds), or None when the
    transport does not say (another transport, a hostile value)."""
    value = delivery_info.get("first_taken")
    if type(value) is float and value > 0:
        return value
    return None


def refusal(
    deliveries: int, taken: float | None, settings: Settings, now: float | None = None
) -> DeliveryLimitError | None:
    """Why a message must not be trained on this delivery, or None to train it."""
    if deliveries > settings.max_deliveries:
        return DeliveryLimitError(
            f"message delivered {deliveries} times, more than ITRAIN_MAX_DELIVERIES="
            f"{settings.max_deliveries}: its event was not trained"
        )
    if taken is not None:
        age = (time.time() if now is None else now) - taken
        if age > settings.expire_after:
            return DeliveryExpiredError(
                f"message first taken {age:.0f} s ago, more than ITRAIN_DEDUPE_TTL - "
                f"ITRAIN_VISIBILITY_TIMEOUT = {settings.dedupe_ttl} - {settings.visibility_timeout} = "
                f"{settings.expire_after:.0f} s: its event was not trained, since its de-duplication "
                f"marker could be gone"
            )
    return None


def answer_refused(
    store: Store, jobs: Sequence[Job], errors: Sequence[DeliveryLimitError]
) -> tuple[list[Outcome], list[tuple[str, bytes]]]:
    """Answer the jobs of refused messages without training them (``errors[i]`` is job i's): an
    event already in the weights answers ``duplicate``, the others FAILURE with that error.
    Returns the outcomes (in job order) and the dead letters, as (model, entry)."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    dead: list[tuple[str, bytes]] = []
    by_model: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_model.setdefault(job.event.model, []).append(i)
    for model, idxs in by_model.items():
        read = store.read(model, None, [jobs[i].event.event_id for i in idxs])
        version = read.checkpoint.version if read.checkpoint is not None else 0
        for k, (i, trained) in enumerate(zip(idxs, read.done, strict=True)):
            job, ev, error = jobs[i], jobs[i].event, errors[i]
            if trained:
                # Trained by an earlier delivery of this message whose result was lost: say so.
                own = own_trained(read.marks[k], job.task_id, model, ev.event_id, version)
                outcomes[i] = own or Outcome.duplicate(job.task_id, model, ev.event_id)
                continue
            outcomes[i] = Outcome.failure(job.task_id, error, event_id=ev.event_id)
            entry = dead_letter_entry(
                job.task_id, error, model=model, event_id=ev.event_id, action_type=ev.action_type
            )
            dead.append((model, entry))
    return [o for o in outcomes if o is not None], dead


class Backoff:
    """The wait before messages that met a Redis fault go back: ``REQUEUE_FIRST_SECONDS``,
    doubling with each consecutive fault up to ``ceiling``; a job that finishes resets it."""

    def __init__(self, ceiling: float, first: float = REQUEUE_FIRST_SECONDS) -> None:
        self.first = min(first, ceiling)
        self.ceiling = ceiling
        self.faults = 0

    def next_delay(self) -> float:
        self.faults += 1
        return float(min(self.first * 2 ** min(self.faults - 1, 60), self.ceiling))

    def reset(self) -> None:
        self.faults = 0


class JobAction(enum.Enum):
    """What becomes of the messages of a pool job that did not finish."""

    #: Back to the queue after the back-off: not the messages' fault; nothing answered.
    REQUEUE = "requeue"
    #: Run each message again alone, to find the one that fails its job.
    SPLIT = "split"
    #: The message failed its job when run alone: the culprit, answered FAILURE and dead-lettered.
    DEAD_LETTER = "dead_letter"


def after_job_failure(exc: BaseException, *, alone: bool) -> JobAction:
    """The policy for a pool job that raised ``exc`` (billiard's ``WorkerLostError`` when its
    process died) instead of returning: a Redis fault gives its messages back; otherwise a batch
    is split and a lone message is the culprit."""
    if is_redis_fault(exc):
        return JobAction.REQUEUE
    return JobAction.DEAD_LETTER if alone else JobAction.SPLIT
