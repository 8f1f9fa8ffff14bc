"""Linger: ``train_step`` calls coalesced into ``itrain.train_batch`` messages, as Kafka producers do.

One ``LPUSH`` per call costs the producer a round trip to Redis (most of ``train_step``'s CPU);
with ``TrainingClient(linger_ms=2)`` the calls of every thread wait in a buffer for at most 2 ms
and leave together as one ``itrain.train_batch`` message in the ``[ids, events]`` form (one
result per event, unlike ``train_many``'s one result per chunk), so each event still gets its
own ``celery-task-meta-<id>`` result. A call returns its
handle at once, before the event is sent.

A buffer is sent when its oldest event has waited ``linger_ms``, when it holds
``ITRAIN_CHUNK_SIZE`` events or nearly ``ITRAIN_MAX_MESSAGE_BYTES`` (by the caller that fills
it, which so feels the back-pressure), on ``flush()``/``close()`` and at interpreter exit.
Events sent with ``result=False`` have their own buffer: a batch message either writes results
for all its events or for none.

A send that fails (``PublishError`` after ``ITRAIN_PUBLISH_TIMEOUT``, ``QueueFullError``) is
not lost silently: every handle of the batch raises that error from ``get()`` (and
``wait_all``), and ``close()`` raises it too. Events still in the buffer when the process dies
(``kill -9``, a crash, ``os._exit``) are lost: at most ``linger_ms`` worth of calls.

A forked child starts with empty buffers (the parent sends what it had buffered) and a sending
thread of its own.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError

from producer.errors import PublishError
from producer.handles import JobHandle
from producer.protocol import TASK_TRAIN_BATCH, EnvelopeTemplate, batch_budget, event_weight, new_task_id

__all__ = ["Linger", "LingerHandle"]

#: How long the sending thread stays without work before it ends (a new call starts another).
_IDLE_SECONDS = 1.0


class _Batch:
    """Events waiting to leave in one message, and what became of the message."""

    __slots__ = ("deadline", "error", "events", "ids", "sent", "size")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.ids: list[str] = []
        self.events: list[bytes] = []
        self.size = 0
        self.sent = threading.Event()  # set once the message is in Redis or failed for good
        self.error: BaseException | None = None


class LingerHandle(JobHandle):
    """The handle of a lingering event: ``get()`` first waits for its batch to be sent, and
    raises the send's error (``PublishError``, ``QueueFullError``) if it failed; ``state`` is
    then ``FAILURE`` and ``ready()`` true."""

    def __init__(self, id: str, app: Celery, batch: _Batch, *, ignored: bool = False) -> None:
        super().__init__(id, app, ignored=ignored)
        self._batch = batch

    @property
    def send_error(self) -> BaseException | None:
        """Why the event could not be sent, or None (sent, or not yet)."""
        return self._batch.error

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:
        start = time.monotonic()
        if not self._batch.sent.wait(timeout):
            raise CeleryTimeoutError("The operation timed out.")
        error = self._batch.error
        if error is not None:
            if propagate:
                raise error
            return error
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
        return super().get(timeout=timeout, propagate=propagate, **kwargs)

    @property
    def state(self) -> str:
        if self._batch.error is not None:
            return str(states.FAILURE)
        return str(super().state)

    status = state

    @property
    def result(self) -> Any:
        if self._batch.error is not None:
            return self._batch.error
        return super().result

    info = result


class Linger:
    """The buffers of one client; ``add`` from any thread."""

    _lock: threading.Lock
    _wake: threading.Condition
    _open: dict[bool, _Batch]  # by ignore_result
    _sending: set[_Batch]
    _errors: list[BaseException]  # failed sends close() has not reported yet
    _thread: threading.Thread | None

    def __init__(
        self,
        publish: Callable[[bytes], None],
        app: Celery,
        *,
        queue: str,
        linger_ms: float,
        max_events: int,
        max_message_bytes: int,
    ) -> None:
        self._publish = publish
        self._app = app
        self._templates = {
            ignore: EnvelopeTemplate(TASK_TRAIN_BATCH, queue, ignore_result=ignore)
            for ignore in (False, True)
        }
        self._delay = linger_ms / 1000.0
        self._max_events = max_events
        self._max_bytes = batch_budget(max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self._reset()
        self._closed = False
        _live.add(self)
        # Weakly: a client dropped without close() must not be kept alive until exit.
        ref = weakref.ref(self)

        def flush_at_exit() -> None:
            linger = ref()
            if linger is not None:
                linger.flush()

        self._at_exit = flush_at_exit
        atexit.register(flush_at_exit)

    def add(self, task_id: str, data: bytes, *, ignored: bool) -> LingerHandle:
        """Buffer one validated event (its JSON) under result id ``task_id``."""
        weight = event_weight(data, self._max_message_bytes)
        full: list[_Batch] = []
        with self._lock:
            if self._closed:
                raise PublishError("the client is closed: nothing was enqueued")
            batch = self._open.get(ignored)
            if batch is not None and batch.size + weight > self._max_bytes:
                full.append(self._take(ignored))
                batch = None
            if batch is None:
                batch = self._open[ignored] = _Batch(time.monotonic() + self._delay)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="itrain-linger", daemon=True)
                    self._thread.start()
                else:
                    self._wake.notify()  # a new deadline for the sending thread
            batch.ids.append(task_id)
            batch.events.append(data)
            batch.size += weight
            if len(batch.ids) >= self._max_events:
                full.append(self._take(ignored))
        for done in full:
            self._send(done, ignored)
        return LingerHandle(task_id, self._app, batch, ignored=ignored)

    def flush(self) -> None:
        """Send every buffered event now and wait for sends under way; errors go to the handles
        (and to ``close()``), they are not raised here."""
        with self._lock:
            taken = [(ignored, self._take(ignored)) for ignored in list(self._open)]
            waiting = list(self._sending)
        for ignored, batch in taken:
            self._send(batch, ignored)
        for batch in waiting:
            batch.sent.wait()

    def settle(self, handles: Sequence[Any]) -> None:
        """Flush, then raise the send error of the first of ``handles`` whose batch failed."""
        self.flush()
        for handle in handles:
            if isinstance(handle, LingerHandle):
                handle._batch.sent.wait()
                if handle._batch.error is not None:
                    raise handle._batch.error

    def close(self) -> None:
        """Flush and stop; raises the first error of a send that failed since the last close()
        (a note counts the others)."""
        with self._lock:
            self._closed = True
        self.flush()
        atexit.unregister(self._at_exit)
        with self._lock:
            self._wake.notify()  # nothing left and closed: the sending thread ends
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            first = errors[0]
            if len(errors) > 1:
                first.add_note(f"{len(errors) - 1} more linger batch(es) of this client failed too")
            raise first

    # -- internals -------------------------------------------------------------------------------

    def _reset(self) -> None:
        # Also in a forked child: the lock may have been held by a thread that is not there.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._open = {}
        self._sending = set()
        self._errors = []
        self._thread = None

    def _take(self, ignored: bool) -> _Batch:
        # Under the lock: the batch leaves the buffers and is counted as being sent.
        batch = self._open.pop(ignored)
        self._sending.add(batch)
        return batch

    def _send(self, batch: _Batch, ignored: bool) -> None:
        args = b"[" + orjson.dumps(batch.ids) + b",[" + b",".join(batch.events) + b"]]"
        envelope = self._templates[ignored].fill(new_task_id(), args, f"[{len(batch.ids)} events]")
        # Handles outlive the batch's events: they keep only its outcome.
        batch.ids, batch.events = [], []
        try:
            self._publish(envelope)
        except Exception as exc:
            batch.error = exc
            with self._lock:
                self._errors.append(exc)
        finally:
            batch.sent.set()
            with self._lock:
                self._sending.discard(batch)

    def _run(self) -> None:
        """The sending thread: sends each buffer when its oldest event has waited long enough."""
        while True:
            with self._lock:
                due = self._wait_for_due()
                if due is None:
                    self._thread = None
                    return
            for ignored, batch in due:
                self._send(batch, ignored)

    def _wait_for_due(self) -> list[tuple[bool, _Batch]] | None:
        # Under the lock; None when the thread should end (closed, or idle for a while).
        idle_until = time.monotonic() + _IDLE_SECONDS
        while True:
            now = time.monotonic()
            if not self._open:
                if self._closed or now >= idle_until:
                    return None
                self._wake.wait(idle_until - now)
                continue
            due = [ignored for ignored, batch in self._open.items() if batch.deadline <= now]
            if due:
                return [(ignored, self._take(ignored)) for ignored in due]
            self._wake.wait(min(batch.deadline for batch in self._open.values()) - now)


_live: weakref.WeakSet[Linger] = weakref.WeakSet()


def _after_fork() -> None:
    for linger in list(_live):
        linger._reset()


os.register_at_fork(after_in_child=_after_fork)
