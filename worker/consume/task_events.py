"""Task events for Flower: published in batches, carrying only what the worker chose to show.

Flower learns about tasks from the events workers publish on the ``celeryev`` exchange (a Redis
``PUBLISH`` each). Celery publishes every task event on its own, or, with an event loop, flushes
its buffer on every loop tick: one or two ``PUBLISH`` per message, several times the cost of
training the event. ``TaskEvents`` keeps the training tasks' events in the group buffer of an
``EventDispatcher`` of its own and publishes the buffer as one list body (``task.multi``, which
Celery's ``EventReceiver`` and so Flower process event by event) every ``FLUSH_SECONDS``, when
``FLUSH_SIZE`` events wait, and at worker shutdown. Measured with a prototype, prefork with one
pool process and events on: ~415 -> ~1,795 msg/s.

What the events carry is decided here, never taken from the message header (any sender sets the
header's ``argsrepr``, ``kwargsrepr`` and ``shadow``; ``send_task(..., argsrepr=...)`` can put a
raw user id there):

* ``task-received``: the task id and the task's registered name; ``args`` is empty.
* ``task-succeeded`` / ``task-failed``: ``args`` built by the worker from the validated event
  (event_id, action_type, model), or ``[N events]`` for a batch, or empty when the message
  could not be decoded.

``HiddenArgsRequest`` does the same for tasks that keep Celery's own strategy (``predict``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import orjson
from celery.events.dispatcher import EventDispatcher
from celery.signals import worker_shutdown
from celery.worker.request import Request

__all__ = [
    "FLUSH_SECONDS",
    "FLUSH_SIZE",
    "GROUP",
    "HIDDEN_ARGS",
    "HiddenArgsRequest",
    "JsonDispatcher",
    "TaskEventFields",
    "TaskEvents",
    "task_events",
]

logger = logging.getLogger("itrain.events")

#: Longest time a task event waits before it is published. Flower shows a task this much later
#: (its pages refresh every second or more). Each publish costs the worker's main process a
#: round trip and kombu's publishing path: at 1,000 events/s, flushing every 20 ms took about a
#: tenth of that process's CPU.
FLUSH_SECONDS = 0.1
#: Events published in one ``PUBLISH`` at most (a list body of ~300 bytes an event).
FLUSH_SIZE = 256
#: What Flower (and the worker log) shows as the arguments of a task whose arguments the worker
#: does not describe itself.
HIDDEN_ARGS = "[event]"
#: The dispatcher group of task events (Celery's, ``worker_send_task_events``).
GROUP = "task"


class JsonDispatcher(EventDispatcher):  # type: ignore[misc]
    """Celery's event dispatcher, whose publishes are encoded by orjson.

    A batch of task events is one list body; the standard library's encoder (kombu's JSON
    serializer) took ~3.3 µs an event, a third of what publishing an event costs a worker
    (``tests/integration/test_task_events.py`` holds the bodies to Celery's). A body orjson
    cannot encode (a big integer, a key that is not text) goes Celery's way, as does any
    serializer other than JSON (``event_serializer``).
    """

    def _publish(
        self,
        event: Any,
        producer: Any,
        routing_key: str,
        retry: bool = False,
        retry_policy: Any = None,
        **rest: Any,
    ) -> None:
        if producer is None or self.serializer != "json":
            return super()._publish(event, producer, routing_key, retry, retry_policy, **rest)  # type: ignore[no-any-return]
        try:
            body = orjson.dumps(event)
        except TypeError:
            return super()._publish(event, producer, routing_key, retry, retry_policy, **rest)  # type: ignore[no-any-return]
        try:
            # Bytes with their content type: kombu sends them as they are (no serializer runs).
            producer.publish(
                body,
                routing_key=routing_key,
                exchange=self.exchange.name,
                retry=retry,
                retry_policy=retry_policy,
                declare=[self.exchange],
                content_type="application/json",
                content_encoding="utf-8",
                headers=self.headers,
                delivery_mode=self.delivery_mode,
            )
        except Exception:
            if not self.buffer_while_offline:
                raise
            self._outbound_buffer.append((event, routing_key))  # published with the next flush
        return None


class TaskEventFields:
    """What each task event of a training message carries (see the module's docstring); a
    subclass publishes them (``_send``)."""

    def received(self, task_id: str, name: str) -> None:
        self._send(
            "task-received",
            uuid=task_id,
            name=name,
            args="",
            kwargs="",
            retries=0,
            eta=None,
            expires=None,
        )

    def succeeded(self, task_id: str, result: Any, runtime: float, args: str, **name: str) -> None:
        """``name``: the task's name, for a task whose ``task-received`` was not sent (Flower takes
        it from any event)."""
        self._send(
            "task-succeeded", uuid=task_id, result=repr(result)[:1024], runtime=runtime, args=args, **name
        )

    def failed(self, task_id: str, error: str, args: str, **name: str) -> None:
        self._send("task-failed", uuid=task_id, exception=error[:1024], traceback="", args=args, **name)

    def outcome(self, summary: tuple[str, str, Any, float, str], **name: str) -> None:
        """The end of a training message, from its summary (``runtime.Summary``)."""
        task_id, state, result, runtime, shown = summary
        if state == "SUCCESS":
            self.succeeded(task_id, result, runtime, shown, **name)
        else:
            self.failed(task_id, str(result), shown, **name)

    def retried(self, task_id: str, reason: str) -> None:
        """The message goes back to the queue (Flower: RETRY until it is received again)."""
        self._send("task-retried", uuid=task_id, exception=reason[:1024], traceback="")

    def _send(self, type_: str, **fields: Any) -> None:
        raise NotImplementedError


class TaskEvents(TaskEventFields):
    """The task events of one worker consumer, buffered and published in batches."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self._timer = consumer.timer
        self._lock = threading.Lock()
        self._tref: Any = None
        self._closed = False
        # A connection of our own: the flush runs on the timer, a thread of its own in pools
        # without an event loop (solo, threads), while Celery's dispatcher publishes worker
        # events from the main thread. It connects on the first publish.
        self._connection = consumer.app.connection_for_write()
        self._dispatcher = JsonDispatcher(
            self._connection,
            app=consumer.app,
            hostname=consumer.hostname,
            buffer_group=[GROUP],
            buffer_limit=FLUSH_SIZE,
            on_send_buffered=self._arm,
        )

    @property
    def enabled(self) -> bool:
        """Whether task events are on: Celery's dispatcher says so (``worker_send_task_events``,
        ``-E``, and the ``enable_events``/``disable_events`` remote controls Flower uses)."""
        d = self._consumer.event_dispatcher
        return bool(d is not None and d.enabled and (not d.groups or GROUP in d.groups))

    def _send(self, type_: str, **fields: Any) -> None:
        if self.enabled and not self._closed:
            self._dispatcher.send(type_, **fields)

    def flush(self) -> None:
        """Publish every buffered event now."""
        with self._lock:
            tref, self._tref = self._tref, None
        if tref is not None:
            tref.cancel()
        if not self._closed:
            self._dispatcher.flush()

    def close(self) -> None:
        """Flush, then close the connection. Events sent later are dropped."""
        try:
            self.flush()
        except Exception as exc:  # shutting down: log, never raise
            logger.warning("task events not published at shutdown: %r", exc)
        self._closed = True
        self._dispatcher.close()
        self._connection.release()

    def _arm(self) -> None:
        # Called by the dispatcher after each buffered event that did not fill the buffer.
        with self._lock:
            if self._tref is not None or self._closed:
                return
            self._tref = self._timer.call_after(FLUSH_SECONDS, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._tref = None
        if self._closed:
            return
        try:
            self._dispatcher.flush()
        except Exception as exc:  # a timer callback must not raise
            # The dispatcher keeps what it could not publish and tries again at the next flush.
            logger.warning("task events not published: %r", exc)


_by_consumer: weakref.WeakKeyDictionary[Any, TaskEvents] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def task_events(consumer: Any) -> TaskEvents:
    """The ``TaskEvents`` of a worker consumer, made once and shared by its task strategies
    (Celery makes the strategies again after each reconnection)."""
    with _registry_lock:
        events = _by_consumer.get(consumer)
        if events is None:
            events = _by_consumer[consumer] = TaskEvents(consumer)
        return events


def _publish_at_shutdown(**_: Any) -> None:
    # Sent after the pool has finished its last jobs, whose results sent the last events.
    with _registry_lock:
        pending = list(_by_consumer.values())
        _by_consumer.clear()
    for events in pending:
        events.close()


worker_shutdown.connect(_publish_at_shutdown, weak=False)


class HiddenArgsRequest(Request):  # type: ignore[misc]
    """Celery's request, minus what the message header says about itself.

    The task-received event, the worker log and a failure's log line show ``HIDDEN_ARGS`` and
    the task's registered name, never the header's ``argsrepr``, ``kwargsrepr`` or ``shadow``
    (an empty ``argsrepr`` would make Celery log the raw arguments instead).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = self._type
        self._argsrepr = self._request_dict["argsrepr"] = HIDDEN_ARGS
        self._kwargsrepr = self._request_dict["kwargsrepr"] = "{}"
        self._request_dict.pop("shadow", None)
