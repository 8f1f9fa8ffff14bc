"""Per-process state and the function a pool process runs for a group of training messages.

``run_messages`` is the whole job of a pool process: read every message once (``admission.admit``:
its valid events as jobs, its refused items with their errors), set aside the jobs of deliveries
``redelivery.refusal`` refuses (too many, or too old for the de-duplication window), train the
rest in one critical section per model, then write every event's result and every dead letter
(with ``results_with_commit``, a batch's results ride in its commit's round trip where they may:
``Trainer.train``; the last section's lock timings are then written once the process is idle,
``idle_flush``).
It returns a small summary per message for the main process, which acks the messages and sends
their task events (Flower).

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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.errors import DeliveryLimitError, EventProcessingError
from producer.events import InteractionData
from producer.protocol import TASK_TRAIN_BATCH
from producer.redis_conn import connect
from producer.settings import Settings, get_settings
from worker.consume.admission import admit
from worker.consume.faults import is_redis_fault
from worker.consume.idle_flush import IdleFlush
from worker.consume.messages import RawMessage, model_hint, printable
from worker.consume.redelivery import answer_refused, refusal
from worker.engine.batch import Job
from worker.outcome import dead_letter_entry, deliveries_known
from worker.store.model_store import Store
from worker.store.replicas import ReplicaBarrier
from worker.store.results import ChunkResult, Outcome, write_results
from worker.training.trainer import Compose, ResultsAlong, Trainer

__all__ = ["ErrorText", "Runtime", "Summary", "flush_timings", "get_runtime", "run_messages", "shown_args"]

logger = logging.getLogger("itrain.runtime")

#: Seconds without a job after which a process writes the lock timings its last job left
#: (``IdleFlush``): the exporter's lock histograms lag a stream's end by about this much.
IDLE_FLUSH_SECONDS = 0.2

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
        # None where nothing waits (no replicas wanted). The commit waits in its own round trip.
        self.store_barrier = ReplicaBarrier.of(self.store_client, settings, settings.store)
        self.results_barrier = ReplicaBarrier.of(self.result_client, settings, settings.backend)
        self.store = Store(self.store_client, settings, barrier=self.store_barrier)
        # The lock's timings go in the results' round trip (``run_messages``).
        self.trainer = Trainer(self.store, settings, defer_timings=True)
        #: Whether a batch's results may ride in its commit's round trip (``Trainer.train``): they
        #: go to the store's Redis, and no replica barrier comes between the commit and them
        #: (with ``ITRAIN_MIN_REPLICAS`` a caller reads ``trained`` only of a commit the replicas
        #: hold: the results follow the commit's wait).
        self.results_with_commit = self.result_client is self.store_client and self.store_barrier is None
        #: Held by ``run_messages`` and by the idle flush, so the two never use the trainer at once.
        self.lock = threading.Lock()
        self.idle = IdleFlush(self.flush_timings, IDLE_FLUSH_SECONDS)

    def flush_timings(self) -> None:
        """Write the lock timings kept for the next round trip (none waiting: nothing sent)."""
        with self.lock:
            self.trainer.flush_timings()


_runtime: tuple[int, Runtime] | None = None


def flush_timings() -> None:
    """Send the lock timings this process keeps, if it has a runtime: they ride with the next
    commit or results otherwise, and an idle worker has none (``pool_fetch``, going idle)."""
    if _runtime is not None and _runtime[0] == os.getpid():
        _runtime[1].flush_timings()


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
    #: Jobs of messages refused by ``redelivery.refusal`` (delivered too often, or too old to
    #: train within the de-duplication window): answered, not trained; and each message's error.
    late: list[Job] = field(default_factory=list)
    late_owner: list[int] = field(default_factory=list)
    late_error: dict[int, DeliveryLimitError] = field(default_factory=dict)
    #: Results of items that ended before training, and the message each belongs to.
    failures: list[Outcome] = field(default_factory=list)
    failure_owner: list[int] = field(default_factory=list)
    dead: dict[str, list[bytes]] = field(default_factory=dict)  # model -> dead letters
    message_error: dict[int, str] = field(default_factory=dict)  # message refused whole
    #: Messages in the chunk form (one result for all their events), and their event counts.
    chunks: dict[int, int] = field(default_factory=dict)
    invalid: dict[int, int] = field(default_factory=dict)  # items failed before training
    #: Task id -> deliveries of its message, for messages delivered more than once (dead letters).
    deliveries: dict[str, int] = field(default_factory=dict)

    def dead_letter(self, model: str, entry: bytes) -> None:
        self.dead.setdefault(model, []).append(entry)


def run_messages(messages: Sequence[RawMessage], *, results_with_commit: bool = False) -> list[Summary]:
    """Train a group of messages; one summary per message, in order.

    ``results_with_commit``: a batch's results ride in its commit's round trip where they may
    (``Trainer.train``), and the lock's timings with them. The last critical section's timings
    then wait for the next round trip that carries any: a process that goes idle writes them
    ``IDLE_FLUSH_SECONDS`` after its last job (``Runtime.idle``), and a pool fetcher as soon
    as it waits on an empty queue (``flush_timings``). Without it (a task called directly),
    the results go after the commit, the timings in front of them.

    Raises only when Redis fails (``is_redis_fault``): then nothing of this group is acked, and
    events already committed come back as ``duplicate`` on the redelivery.
    """
    rt = get_runtime()
    with rt.lock:
        summaries = _run_messages(rt, messages, results_with_commit)
    if rt.trainer.timings_waiting:
        rt.idle.touch()
    return summaries


def _run_messages(rt: Runtime, messages: Sequence[RawMessage], results_with_commit: bool) -> list[Summary]:
    start = time.perf_counter()
    plan = _Plan()
    for m, msg in enumerate(messages):
        _admit(plan, m, msg, rt.settings)
    # Results in the commit's round trip where they may (``_composer`` says which).
    with_commit = results_with_commit and rt.results_with_commit
    with deliveries_known(plan.deliveries):
        outcomes, owners = _train_and_dead_letter(rt, messages, plan, with_commit)
    # The lock's timings ride in front of the results when both go to the same Redis (or, when
    # every result rode in its commit's round trip, with the next commit).
    timings = rt.trainer.queue_timings if rt.result_client is rt.store_client else None
    if timings is None:
        rt.trainer.flush_timings()
    wanted = _wanted(messages, plan, outcomes, owners)
    if wanted or not with_commit:
        write_results(
            rt.result_client,
            wanted,
            rt.settings.result_expires,
            before=timings,
            barrier=rt.results_barrier if wanted else None,
            event_ids=[j.event.event_id for j in plan.jobs],
        )
    return _summaries(messages, plan, outcomes, owners, time.perf_counter() - start)


def _train_and_dead_letter(
    rt: Runtime, messages: Sequence[RawMessage], plan: _Plan, with_commit: bool
) -> tuple[list[Outcome], list[int]]:
    """Train the plan's jobs one model at a time (``with_commit``: their results ride in the
    commit's round trip), answer the refused deliveries and write every dead letter; returns the
    outcomes and the message index of each."""
    results = ResultsAlong(rt.settings.result_expires, _composer(messages, plan)) if with_commit else None
    outcomes: list[Outcome] = []
    owners: list[int] = []
    by_model: dict[str, list[int]] = {}
    for i, job in enumerate(plan.jobs):
        by_model.setdefault(job.event.model, []).append(i)
    for idxs in by_model.values():
        # One model at a time, so an error raised for one event never undoes another model's commit.
        outcomes.extend(_train_isolated(rt.trainer, [plan.jobs[i] for i in idxs], plan, results))
        owners.extend(plan.owner[i] for i in idxs)
    if plan.late:
        errors = [plan.late_error[m] for m in plan.late_owner]
        answered, dead = answer_refused(rt.store, plan.late, errors)
        for model, entry in dead:
            plan.dead_letter(model, entry)
        for m, error in plan.late_error.items():
            logger.warning("task %s: %s", printable(messages[m].task_id), error)
        outcomes.extend(answered)
        owners.extend(plan.late_owner)

    # Dead letters first: whoever sees a FAILURE result also sees its dead letter.
    for model, entries in plan.dead.items():
        rt.store.dead_letter(model, entries)
    return outcomes, owners


def _composer(messages: Sequence[RawMessage], plan: _Plan) -> Compose:
    """Which of a critical section's outcomes ride in its commit's round trip: each event's own
    result, and a chunk's one result when the section answers every event of the chunk (its
    invalid items, refused before training, or events of another model, keep it for after);
    nothing for fire-and-forget messages (``ignore_result``)."""
    ignored = {m for m, msg in enumerate(messages) if msg.ignore_result}
    owner = {id(job): m for job, m in zip(plan.jobs, plan.owner, strict=True)}

    def compose(
        jobs: Sequence[Job], outcomes: list[Outcome]
    ) -> tuple[list[Outcome | ChunkResult], list[Outcome]]:
        written: list[Outcome | ChunkResult] = []
        covered: list[Outcome] = []
        of_chunk: dict[int, list[Outcome]] = {}
        for job, o in zip(jobs, outcomes, strict=True):
            m = owner.get(id(job))
            if m is None or m in ignored:
                continue
            if m in plan.chunks:
                of_chunk.setdefault(m, []).append(o)
            else:
                written.append(o)
                covered.append(o)
        for m, mine in of_chunk.items():
            if len(mine) == plan.chunks[m] and m not in plan.message_error:
                written.append(ChunkResult(messages[m].task_id, plan.chunks[m], mine))
                covered.extend(mine)
        return written, covered

    return compose


def _wanted(
    messages: Sequence[RawMessage], plan: _Plan, outcomes: list[Outcome], owners: list[int]
) -> list[Outcome | ChunkResult]:
    """The results to write: one per event, and one per message in the chunk form; none for
    messages sent with Celery's ``ignore_result`` (fire-and-forget), whose events are trained and
    dead-lettered as any other's, and whose task events (Flower) are still sent. None either
    for results written already, in their commit's round trip (``Outcome.stored``: a chunk's
    when each of its outcomes is)."""
    ignored = {m for m, msg in enumerate(messages) if msg.ignore_result}
    if not ignored and not plan.chunks:
        return [*(o for o in outcomes if not o.stored), *plan.failures]
    wanted: list[Outcome | ChunkResult] = []
    of_chunk: dict[int, list[Outcome]] = {m: [] for m in plan.chunks}
    pairs = zip([*outcomes, *plan.failures], [*owners, *plan.failure_owner], strict=True)
    for o, m in pairs:
        if m in ignored:
            continue
        if m in of_chunk:
            of_chunk[m].append(o)
        elif not o.stored:
            wanted.append(o)
    for m, size in plan.chunks.items():
        mine = of_chunk[m]
        if m in ignored or m in plan.message_error or (mine and all(o.stored for o in mine)):
            continue
        wanted.append(ChunkResult(messages[m].task_id, size, mine))
    return wanted


# -- routing what admission read ------------------------------------------------------------------


def _admit(plan: _Plan, m: int, msg: RawMessage, settings: Settings) -> None:
    """Route what ``admit`` read of message ``m``: its jobs to train (or, when ``redelivery``
    refuses this delivery, to answer untrained), its refused items to FAILURE results and dead
    letters."""
    admitted = admit(msg, settings.max_message_bytes)
    if msg.deliveries > 1:
        plan.deliveries[msg.task_id] = msg.deliveries
        for job in admitted.jobs:
            plan.deliveries[job.task_id] = msg.deliveries
    if admitted.chunk is not None:
        plan.chunks[m] = admitted.chunk
    if admitted.error is not None:
        plan.message_error[m] = admitted.error
    if admitted.jobs:
        refused = refusal(msg.deliveries, msg.first_taken, settings)
        if refused is None:
            plan.jobs.extend(admitted.jobs)
            plan.owner.extend([m] * len(admitted.jobs))
        else:
            plan.late_error[m] = refused
            plan.late.extend(admitted.jobs)
            plan.late_owner.extend([m] * len(admitted.jobs))
    if admitted.refused:
        plan.invalid[m] = len(admitted.refused)
        for item in admitted.refused:
            entry = _entry(item.task_id, item.error, item.payload, msg.deliveries)
            plan.dead_letter(model_hint(item.payload), entry)
            if item.answer:
                event_id = _event_id_hint(item.payload)
                plan.failures.append(Outcome.failure(item.task_id, item.error, event_id=event_id))
                plan.failure_owner.append(m)
                logger.warning("task %s failed: %s", printable(item.task_id), item.error)


def _entry(task_id: Any, exc: BaseException, payload: Any, deliveries: int) -> bytes:
    extra = {"payload_kind": type(payload).__name__} if payload is not None else None
    return dead_letter_entry(
        printable(task_id),
        exc,
        model=model_hint(payload),
        event_id=_event_id_hint(payload),
        extra=extra,
        deliveries=deliveries,
    )


def _event_id_hint(payload: Any) -> str | None:
    event_id = payload.get("event_id") if isinstance(payload, dict) else None
    if isinstance(event_id, str) and 0 < len(event_id) <= 128:
        return printable(event_id)
    return None


# -- training, one model at a time ---------------------------------------------------------------


def _train_isolated(
    trainer: Trainer, jobs: list[Job], plan: _Plan, results: ResultsAlong | None
) -> list[Outcome]:
    """``trainer.train(jobs)``; when it raises for a reason that is not Redis's, the jobs are
    trained again in halves until the event that raises is alone, and only that one fails.

    A half that trained is committed; it is not tried again. Events of a half that raised were not
    committed (the trainer raises before its commit, or the retry answers them ``duplicate``).
    """
    try:
        return trainer.train(jobs, results=results)
    except Exception as exc:
        if is_redis_fault(exc):
            raise
        if len(jobs) > 1:
            half = len(jobs) // 2
            return [
                *_train_isolated(trainer, jobs[:half], plan, results),
                *_train_isolated(trainer, jobs[half:], plan, results),
            ]
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
