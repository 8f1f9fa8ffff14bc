"""Worker-side micro-batching: a Celery task strategy that trains waiting messages together.

Celery hands each message of a task to its strategy in the worker's main process. This one does
not send each message to the pool on its own: it buffers ``itrain.train_step`` messages and
flushes them as one pool job when ``ITRAIN_BATCH_MAX`` are waiting or ``ITRAIN_BATCH_WAIT_MS``
after the first arrived, so events that wait together share one lock acquisition, one
checkpoint read and one commit. ``itrain.train_batch`` messages are batches already and go to
the pool at once.

Why not celery-batches: it sends no task events (Flower would not see training tasks) and pins
an older Celery. This strategy keeps what Celery's own gives: task events for every message
(received, then succeeded or failed; no "started", which would cost a third more publishing per
message for a state that lasts milliseconds), late acknowledgement (a message is acked only after its
results are written), and a requeue when the pool process running it dies.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, Task

from producer.settings import get_settings
from worker.consume.messages import RawMessage
from worker.consume.runtime import Summary, run_messages

__all__ = ["training_strategy"]

logger = logging.getLogger("itrain.batching")


class _Pending:
    __slots__ = ("ack", "raw", "received", "reject")

    def __init__(self, raw: RawMessage, ack: Any, reject: Any) -> None:
        self.raw = raw
        self.ack = ack
        self.reject = reject
        self.received = time.monotonic()


class _Buffer:
    def __init__(self, task: Task, consumer: Any, buffered: bool) -> None:
        settings = get_settings()
        self.task = task
        self.pool = consumer.pool
        self.timer = consumer.timer
        # After a broker loss the message's channel is closed, and kombu raises AttributeError
        # from an ack or a reject on it. The message is still in Redis (kombu's unacked hash) and
        # comes back after ITRAIN_VISIBILITY_TIMEOUT: log it like a connection error, do not let
        # it stop the worker.
        self.connection_errors = (*consumer.connection_errors, AttributeError)
        eventer = consumer.event_dispatcher
        self.send_event = eventer.send if (eventer and eventer.enabled and task.send_events) else None
        self.max = settings.batch_max if buffered else 1
        self.wait = settings.batch_wait_ms / 1000.0
        self.items: list[_Pending] = []
        self.tref: Any = None
        # The timer runs in its own thread for pools without an event loop (solo, threads).
        self.mutex = threading.Lock()

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        headers = message.headers or {}
        task_id = str(headers.get("id") or message.properties.get("correlation_id") or "")
        raw = RawMessage(
            task=self.task.name,
            task_id=task_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            compression=headers.get("compression"),
            # Only bytes or text is a body; anything else (a hostile envelope) becomes an empty
            # body, refused under its task id as "not valid JSON", never bytes(<huge int>).
            body=(
                message.body
                if isinstance(message.body, bytes)
                else message.body.encode()
                if isinstance(message.body, str)
                else b""
            ),
        )
        if self.send_event:
            self.send_event(
                "task-received",
                uuid=task_id,
                name=self.task.name,
                args=str(headers.get("argsrepr") or "")[:200],
                kwargs="{}",
                retries=headers.get("retries", 0) or 0,
                root_id=headers.get("root_id"),
                parent_id=headers.get("parent_id"),
                eta=None,
                expires=None,
            )
        with self.mutex:
            self.items.append(_Pending(raw, ack, reject))
            full = len(self.items) >= self.max
            if not full and self.tref is None:
                self.tref = self.timer.call_after(self.wait, self.flush)
        if full:
            self.flush()

    def flush(self) -> None:
        with self.mutex:
            items, self.items = self.items, []
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
        if not items:
            return
        self.pool.apply_async(
            run_messages,
            args=([p.raw for p in items],),
            callback=partial(self._on_done, items),
            error_callback=partial(self._on_error, items),
        )

    def _on_done(self, items: list[_Pending], summaries: list[Summary]) -> None:
        for p, (task_id, state, result, runtime, _shown) in zip(items, summaries, strict=True):
            if self.send_event:
                if state == "SUCCESS":
                    self.send_event(
                        "task-succeeded", uuid=task_id, result=repr(result)[:1024], runtime=runtime
                    )
                else:
                    self.send_event("task-failed", uuid=task_id, exception=str(result)[:1024], traceback="")
            # Late ack: only now are the results and weights in Redis.
            p.ack(logger, self.connection_errors)

    def _on_error(self, items: list[_Pending], exc: BaseException) -> None:
        # The pool process died (WorkerLostError) or Redis failed mid-batch: give every message
        # back to the queue. Events already committed come back as ``duplicate``.
        # billiard hands over an ExceptionInfo wrapping the exception (WorkerLostError when the
        # pool process died).
        exc = getattr(getattr(exc, "exception", None), "exc", exc)
        lost = isinstance(exc, WorkerLostError)
        logger.error("batch of %d message(s) not finished (%r); requeued", len(items), exc)
        for p in items:
            if self.send_event:
                self.send_event(
                    "task-failed" if not lost else "task-rejected",
                    uuid=p.raw.task_id,
                    exception=repr(exc)[:1024],
                    traceback="",
                    requeue=True,
                )
            p.reject(logger, self.connection_errors, True)


def training_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """The ``Strategy`` of the training tasks (see ``Task.Strategy``)."""
    return _Buffer(task, consumer, buffered=getattr(task, "buffered", False)).on_message
