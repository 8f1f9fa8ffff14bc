"""Worker-side micro-batching: a Celery task strategy that trains waiting messages together.

Celery hands each message of a task to its strategy in the worker's main process. This one does
not send each message to the pool on its own: it buffers messages and flushes them as one pool
job, so events that wait together share one lock acquisition, one checkpoint read, one commit
and one results write. A job holds at most ``ITRAIN_BATCH_MAX`` events (an
``itrain.train_step`` message is one event; an ``itrain.train_batch`` message counts as
``ITRAIN_CHUNK_SIZE``, its most, so the main process never decodes a body to count):

* ``itrain.train_step`` messages wait at most ``ITRAIN_BATCH_WAIT_MS``: before they are taken,
  while they come fast enough for the wait to gather a few (``fetch_window``, the transport's;
  those of one fetch then go together, as chunks do), or, with ``ITRAIN_BATCH_WAIT_ADAPTIVE=0``,
  in this buffer after the first arrived;
* ``itrain.train_batch`` messages are batches already and wait for nothing: those that arrived
  in one fetch from the queue go together, flushed on the event loop's next turn. So a lone
  chunk goes to the pool at once, and when the queue is deep one lock covers ~1,000 events
  instead of one chunk's.

Why not celery-batches: it sends no task events (Flower would not see training tasks) and pins
an older Celery. This strategy keeps what Celery's own gives: task events for every message
(received, then succeeded or failed, published in batches by ``task_events``; no "started",
which would cost a third more events for a state that lasts milliseconds), late
acknowledgement (a message is acked only after its results are written), and no message lost
when the pool process running it dies.

When a pool job does not finish, ``redelivery.after_job_failure`` decides (``redelivery`` owns
the requeue / delivery-limit / dead-letter policy):

* Redis failed under it (``is_redis_fault``): not the messages' fault. They go back to the queue
  after a back-off that grows with consecutive faults (``redelivery.Backoff``, up to
  ``ITRAIN_REQUEUE_BACKOFF_MAX``), never at once: an instant requeue would loop as fast as Redis
  fails. The give-back does not count as a delivery. Nothing is dead-lettered.
* The pool process died (billiard's ``WorkerLostError``: a segfault, the OOM killer, a SIGKILL)
  or the job raised: each of its messages runs again alone, as its own pool job, so one
  message that kills its process cannot take its neighbours down with it. A message whose
  lone run fails the same way is the culprit: it ends as FAILURE naming the cause, with one
  dead-letter entry, and is acknowledged. Its neighbours train. Events committed before the
  death come back as ``duplicate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, Task

from producer.enqueue_time import enqueued_at
from producer.errors import InvalidEventError, ItrainError
from producer.formats import header_format
from producer.protocol import TASK_TRAIN_BATCH
from producer.settings import get_settings
from worker.consume.admission import admit
from worker.consume.faults import is_redis_fault
from worker.consume.messages import TASK_ID_MAX, RawMessage, check_task_id, model_hint, printable
from worker.consume.redelivery import Backoff, JobAction, after_job_failure, delivery_count, first_taken
from worker.consume.runtime import Summary, get_runtime, run_messages, shown_args
from worker.consume.task_events import TaskEvents, task_events
from worker.consume.turns import turns_for
from worker.outcome import dead_letter_entry
from worker.store.results import Outcome, failure_payload, write_results

__all__ = ["dead_letter_culprit", "raw_fields", "raw_message", "taken_from", "training_strategy"]

logger = logging.getLogger("itrain.batching")


def raw_message(task_name: str, message: Any) -> RawMessage:
    """The plain-data form of a kombu message, as the pool process receives it."""
    return raw_fields(
        task_name,
        message.headers,
        message.properties,
        message.delivery_info,
        message.body,
        message.content_type,
        message.content_encoding,
    )


def raw_fields(
    task_name: str,
    headers: Any,
    properties: Any,
    info: Any,
    body: Any,
    content_type: Any,
    content_encoding: Any,
) -> RawMessage:
    """The plain-data form of a message from its parts (a kombu message's, or an envelope's with
    its body decoded: ``worker.consume.pool_fetch``), whatever their types."""
    headers = headers if isinstance(headers, dict) else {}
    properties = properties if isinstance(properties, dict) else {}
    task_id = headers.get("id") or properties.get("correlation_id") or ""
    info = info if isinstance(info, Mapping) else {}
    taken = first_taken(info)
    return RawMessage(
        task=task_name,
        # A task id that is not text is refused by ``run_messages`` (as an empty id), never
        # turned into text here: str() of a hostile huge integer raises.
        task_id=task_id if isinstance(task_id, str) else "",
        content_type=content_type if isinstance(content_type, str) else None,
        content_encoding=content_encoding if isinstance(content_encoding, str) else None,
        compression=headers.get("compression"),
        # Only bytes or text is a body; anything else (a hostile envelope) becomes an empty
        # body, refused under its task id as "not valid JSON", never bytes(<huge int>). Text
        # with lone surrogates stays undecodable instead of raising here.
        body=(
            body
            if isinstance(body, bytes)
            else body.encode("utf-8", "surrogatepass")
            if isinstance(body, str)
            else b""
        ),
        deliveries=delivery_count(info),
        # Only a JSON true counts: a hostile "false" string must not silence a result.
        ignore_result=headers.get("ignore_result") is True,
        first_taken=taken,
        message_format=header_format(headers),
        enqueued_at=enqueued_at(headers) or taken or time.time(),
    )


def taken_from(message: Any) -> str:
    """The queue a message was taken from (our transport says so), or "" when unknown."""
    info = message.delivery_info if isinstance(message.delivery_info, Mapping) else {}
    queue = info.get("taken_from") or info.get("routing_key") or ""
    return queue if isinstance(queue, str) else ""


class _Pending:
    __slots__ = ("ack", "queue", "raw", "received", "reject")

    def __init__(self, raw: RawMessage, ack: Any, reject: Any, queue: str) -> None:
        self.raw = raw
        self.ack = ack
        self.reject = reject
        self.queue = queue
        self.received = time.monotonic()


class _Buffer:
    def __init__(self, task: Task, consumer: Any, buffered: bool) -> None:
        settings = get_settings()
        self.task = task
        self.pool = consumer.pool
        # Pool jobs take turns by queue (``turns``): a flooded queue cannot hold the pool.
        self.turns = turns_for(consumer.pool)
        self.timer = consumer.timer
        # After a broker loss the message's channel is closed, and kombu raises AttributeError
        # from an ack or a reject on it. The message is still in Redis (kombu's unacked hash) and
        # comes back after ITRAIN_VISIBILITY_TIMEOUT: log it like a connection error, do not let
        # it stop the worker.
        self.connection_errors = (*consumer.connection_errors, AttributeError)
        self.events: TaskEvents | None = task_events(consumer) if task.send_events else None
        self.max = settings.batch_max  # events per pool job
        #: Events a message counts for: one ``train_step``, or a ``train_batch`` chunk at its most.
        self.weight = 1 if buffered else settings.chunk_size
        # A chunk waits only for the other messages of its fetch (delivered in one loop turn);
        # so does a train_step message when the transport gathered it (ITRAIN_BATCH_WAIT_ADAPTIVE:
        # its fetch came after the wait, ``worker.consume.fetch_window``).
        held = buffered and not settings.batch_wait_adaptive
        self.wait = settings.batch_wait_ms / 1000.0 if held else 0.0
        # One micro-batch in the making per queue: a job holds one queue's messages.
        self.items: dict[str, list[_Pending]] = {}
        self.size: dict[str, int] = {}  # events counted in ``items``
        self.trefs: dict[str, Any] = {}
        #: Consecutive pool jobs that Redis failed set the wait before their messages go back.
        self.backoff = Backoff(settings.requeue_ceiling)
        # The timer runs in its own thread for pools without an event loop (solo, threads).
        self.mutex = threading.Lock()

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        raw = raw_message(self.task.name, message)
        queue = taken_from(message)
        if self.events:
            self.events.received(raw.task_id, self.task.name)
        with self.mutex:
            self.items.setdefault(queue, []).append(_Pending(raw, ack, reject, queue))
            size = self.size[queue] = self.size.get(queue, 0) + self.weight
            full = size >= self.max
            if not full and queue not in self.trefs:
                self.trefs[queue] = self.timer.call_after(self.wait, partial(self.flush, queue))
        if full:
            self.flush(queue)

    def flush(self, queue: str) -> None:
        with self.mutex:
            items = self.items.pop(queue, [])
            self.size.pop(queue, None)
            tref = self.trefs.pop(queue, None)
            if tref is not None:
                tref.cancel()
        if items:
            self._submit(items, alone=False)

    def _submit(self, items: list[_Pending], *, alone: bool) -> None:
        self.turns.submit(items[0].queue, self, items, self.weight, alone=alone)

    def start(self, items: list[_Pending], alone: bool, finished: Callable[[], None]) -> Any:
        """Hand ``items`` to the pool as one job (``Turns`` decides when); the pool's handle."""
        return self.pool.apply_async(
            run_messages,
            args=([p.raw for p in items],),
            # The results ride in the commit's round trip (one round trip a job fewer).
            kwargs={"results_with_commit": True},
            callback=partial(_then, finished, partial(self._on_done, items)),
            error_callback=partial(_then, finished, partial(self._on_error, items, alone)),
        )

    def _on_done(self, items: list[_Pending], summaries: list[Summary]) -> None:
        self.backoff.reset()
        for p, summary in zip(items, summaries, strict=True):
            if self.events:
                self.events.outcome(summary)
            # Late ack: only now are the results and weights in Redis.
            p.ack(logger, self.connection_errors)

    def _on_error(self, items: list[_Pending], alone: bool, error: Any) -> None:
        exc = _unwrap(error)
        action = after_job_failure(exc, alone=alone)
        if action is JobAction.REQUEUE:
            self._requeue_later(items, exc)
        elif action is JobAction.SPLIT:
            logger.error(
                "batch of %d message(s) not finished (%s); running each alone to find the cause",
                len(items),
                _describe(exc),
            )
            for p in items:
                self._submit([p], alone=True)
        else:
            self._dead_letter(items[0], exc)

    def _requeue_later(self, items: list[_Pending], exc: BaseException) -> None:
        delay = self.backoff.next_delay()
        cause = "Redis failed" if is_redis_fault(exc) else "not dead-lettered"
        reason = f"{cause} ({_describe(exc)})"
        logger.warning("%s under %d message(s); requeued in %.1f s", reason, len(items), delay)
        self.timer.call_after(delay, partial(self._requeue, items, f"requeued: {reason}"))

    def _requeue(self, items: list[_Pending], reason: str) -> None:
        # reject(requeue=True): our transport gives the message back and takes its delivery
        # count back in one script (``redelivery``); a message too old to train by then is
        # answered as expired on its next delivery, never trained.
        for p in items:
            if self.events:
                self.events.retried(p.raw.task_id, reason)
            p.reject(logger, self.connection_errors, True)

    def _dead_letter(self, p: _Pending, exc: BaseException) -> None:
        try:
            error, shown = dead_letter_culprit(p.raw, exc)
        except Exception as fault:
            # Redis failed (or, a bug, our own code): the message must not be lost, and this is
            # the main process, which must not stop. Back to the queue, after the backoff.
            if not is_redis_fault(fault):
                logger.exception("task %s could not be dead-lettered", _printable(p.raw.task_id))
            self._requeue_later([p], fault)
            return
        if self.events:
            self.events.failed(p.raw.task_id, error, shown)
        p.ack(logger, self.connection_errors)


def _then(finished: Callable[[], None], callback: Callable[[Any], None], value: Any) -> None:
    """Run a job's callback, then let the next job have the pool process (``Turns``)."""
    try:
        callback(value)
    finally:
        finished()


def _unwrap(error: Any) -> BaseException:
    """The exception of a failed pool job: billiard hands over an ``ExceptionInfo`` whose
    ``exception`` wraps the original in ``.exc``."""
    inner = getattr(getattr(error, "exception", error), "exc", getattr(error, "exception", error))
    if isinstance(inner, BaseException):
        return inner
    return error if isinstance(error, BaseException) else ItrainError(repr(error))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _culprit_error(raw: RawMessage, exc: BaseException) -> BaseException:
    if isinstance(exc, WorkerLostError):
        lost: BaseException = WorkerLostError(
            f"the worker process running {raw.task} died ({_describe(exc)}) each time it ran this message, "
            f"the second time alone: the message is taken as the cause and not retried"
        )
        return lost
    return ItrainError(f"{raw.task} failed each time it ran, the second time alone: {_describe(exc)}")


def _result_id(value: Any) -> bool:
    """Whether ``value`` can name a result key (``check_task_id``'s rule)."""
    try:
        check_task_id(value)
    except InvalidEventError:
        return False
    return True


def _printable(value: str) -> str:
    """``value`` as valid UTF-8 text no longer than a task id may be."""
    return printable(value, TASK_ID_MAX)


#: (result ids, model, event id, args to show, the dead letter's extra fields)
_Description = tuple[list[str], str, str | None, str, dict[str, Any] | None]


def _describe_culprit(raw: RawMessage, max_bytes: int) -> _Description:
    """The culprit as admission reads it (the same one pass a pool process makes): the result ids
    that get its FAILURE, the model whose list gets its dead letter, its event id, the args to
    show and the dead letter's extra fields. A message that does not read is described by its
    task id alone."""
    try:
        admitted = admit(raw, max_bytes)
    except Exception as exc:  # a hostile body must not stop the main process
        logger.debug("dead-lettered message %s does not read: %r", _printable(raw.task_id), exc)
        return [raw.task_id], "default", None, "", None
    first = admitted.jobs[0].event if admitted.jobs else None
    model = (
        first.model if first else model_hint(admitted.refused[0].payload) if admitted.refused else "default"
    )
    batch = raw.task == TASK_TRAIN_BATCH
    if first is None and (admitted.error is not None or not batch):  # it failed whole
        return [raw.task_id], model, None, "", None
    if not batch and first is not None:
        return [raw.task_id], first.model, first.event_id, shown_args(first), None
    # A chunk's one result is the message's (every event of it reads that FAILURE); an
    # [ids, events] batch answers under each id that can name a result.
    ids = [j.task_id for j in admitted.jobs] + [r.task_id for r in admitted.refused if r.answer]
    if admitted.chunk is not None or not ids:
        ids = [raw.task_id]
    return ids, model, None, f"[{admitted.events} events]", {"events": admitted.events}


def dead_letter_culprit(raw: RawMessage, exc: BaseException) -> tuple[str, str]:
    """End a message that failed its job even when run alone: one dead-letter entry, then a
    FAILURE result for each of its results that has none yet. Returns (error text, args to
    show). Runs in the worker's main process; a Redis fault propagates."""
    rt = get_runtime()
    error = _culprit_error(raw, exc)
    ids, model, event_id, shown, extra = _describe_culprit(raw, rt.settings.max_message_bytes)
    ids = [task_id for task_id in ids if _result_id(task_id)]
    entry = dead_letter_entry(
        _printable(raw.task_id), error, model=model, event_id=event_id, extra=extra, deliveries=raw.deliveries
    )
    # Dead letter first: whoever sees the FAILURE result also sees its dead letter. A result
    # already written (an event committed before the process died) is left alone. With
    # ITRAIN_MIN_REPLICAS (``worker.store.replicas``) each waits for the replicas in its round
    # trip: a shortfall raises, and the caller puts the message back on the queue.
    rt.store.dead_letter(model, [entry])
    if not raw.ignore_result:  # fire-and-forget: the dead letter only
        failed = failure_payload(error)
        failures = [Outcome(task_id, "FAILURE", failed, keep_existing=True) for task_id in ids]
        write_results(rt.result_client, failures, rt.settings.result_expires, barrier=rt.results_barrier)
    logger.error("task %s dead-lettered: %s", _printable(raw.task_id), error)
    return str(error), shown


def training_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """The ``Strategy`` of the training tasks (see ``Task.Strategy``)."""
    return _Buffer(task, consumer, buffered=getattr(task, "buffered", False)).on_message
