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
``wait_all``), and ``close()`` raises it too. A batch pushed but acknowledged by fewer replicas
than ``ITRAIN_MIN_REPLICAS`` is in Redis and its handles stay live: the ``ReplicationError``
(naming every such event) comes from the next ``flush()`` or ``close()``, and from ``wait_all``
on its handles. Events still in the buffer when the process dies
(``kill -9``, a crash, ``os._exit``) are lost: at most ``linger_ms`` worth of calls.

Each event is routed when its batch is sent, not when it is buffered (``producer.routes``): the
sending side reads the routes when its copy is due, so ``train_step`` does no I/O, and a batch
whose events go to several queues leaves as one message per queue, all in one push.

A forked child starts with empty buffers (the parent sends what it had buffered) and a sending
thread of its own.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from celery import Celery, states

from producer.errors import PublishError, ReplicationError
from producer.handles import JobHandle, timed_out
from producer.protocol import TASK_TRAIN_BATCH, EnvelopeTemplate, batch_budget, event_weight, new_task_id
from producer.routes import DEFAULT_MODEL, group_by_queue

__all__ = ["Build", "Linger", "LingerBuffers", "LingerHandle", "merge_shortfalls", "send_error"]

#: What a linger hands its client to send: given the routes (model -> queue), a batch's
#: messages by queue; the client reads the routes first when its copy is due.
Build = Callable[[Callable[[str], str]], list[tuple[str, list[bytes]]]]

#: How long the sending thread stays without work before it ends (a new call starts another).
_IDLE_SECONDS = 1.0


class _Batch:
    """Events waiting to leave in one message, and what became of the message."""

    __slots__ = (
        "deadline",
        "error",
        "event_ids",
        "events",
        "ids",
        "ignored",
        "models",
        "opened",
        "sent",
        "short",
        "size",
    )

    def __init__(self, deadline: float, ignored: bool) -> None:
        self.deadline = deadline
        #: When its first event was accepted (unix seconds): the message's enqueue time, so the
        #: time to commit counts the linger too.
        self.opened = time.time()
        self.ignored = ignored  # sent with ignore_result (no results written)
        self.ids: list[str] = []
        self.events: list[bytes] = []
        self.models: list[str] = []  # each event's model, routed when the batch is sent
        self.event_ids: list[str] = []  # for a ReplicationError (the caller may not know them)
        self.size = 0
        self.sent = threading.Event()  # set once the message is in Redis or failed for good
        self.error: BaseException | None = None
        #: Pushed, but too few replicas acknowledged it (the handles stay live).
        self.short: ReplicationError | None = None


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
            raise timed_out(self.id, timeout)
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


class LingerBuffers:
    """The buffers of one client, without threads or I/O: which batch an event joins, when a
    batch is due, its message, and what became of it. ``Linger`` (threads) and the asyncio
    client's linger drive it; they keep calls to it one at a time (a lock, or the event loop)."""

    def __init__(
        self, app: Celery, *, queue: str, linger_ms: float, max_events: int, max_message_bytes: int
    ) -> None:
        self.app = app
        self.delay = linger_ms / 1000.0
        self.queue = queue
        self._templates: dict[tuple[str, bool], EnvelopeTemplate] = {}
        self._max_events = max_events
        self._max_bytes = batch_budget(max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self.open: dict[bool, _Batch] = {}  # by ignore_result
        self.sending: set[_Batch] = set()
        self._errors: list[BaseException] = []  # failed sends not reported by a close yet
        self._short: list[_Batch] = []  # replication shortfalls not reported yet

    def weigh(self, data: bytes) -> int:
        """What an event's JSON weighs in a message; ``InvalidEventError`` when it cannot fit."""
        return event_weight(data, self._max_message_bytes)

    def put(
        self,
        task_id: str,
        data: bytes,
        event_id: str,
        weight: int,
        *,
        ignored: bool,
        model: str = DEFAULT_MODEL,
    ) -> tuple[LingerHandle, list[_Batch], bool]:
        """Buffer one event: its handle, the batches now full (taken, to be sent by the caller at
        once), and whether a new batch was opened (its deadline is new)."""
        full: list[_Batch] = []
        batch = self.open.get(ignored)
        if batch is not None and batch.size + weight > self._max_bytes:
            full.append(self.take(ignored))
            batch = None
        opened = batch is None
        if batch is None:
            batch = self.open[ignored] = _Batch(time.monotonic() + self.delay, ignored)
        batch.ids.append(task_id)
        batch.events.append(data)
        batch.models.append(model)
        batch.event_ids.append(event_id)
        batch.size += weight
        if len(batch.ids) >= self._max_events:
            full.append(self.take(ignored))
        return LingerHandle(task_id, self.app, batch, ignored=ignored), full, opened

    def take(self, ignored: bool) -> _Batch:
        """The open batch leaves the buffers and is counted as being sent."""
        batch = self.open.pop(ignored)
        self.sending.add(batch)
        return batch

    def take_all(self) -> list[_Batch]:
        return [self.take(ignored) for ignored in list(self.open)]

    def take_due(self, now: float) -> list[_Batch]:
        """The batches whose oldest event has waited ``linger_ms``."""
        return [self.take(ignored) for ignored, b in list(self.open.items()) if b.deadline <= now]

    def next_deadline(self) -> float | None:
        return min((b.deadline for b in self.open.values()), default=None)

    def messages(self, batch: _Batch, route: Callable[[str], str]) -> list[tuple[str, list[bytes]]]:
        """The batch's ``itrain.train_batch`` messages in the ``[ids, events]`` form, one per
        queue its events' models are routed to (``route``: model -> queue), each queue's events
        in their order. Handles outlive the batch's events, so they are dropped here (handles keep
        only its outcome)."""
        queues = [route(m) for m in batch.models]
        groups = {queues[0]: range(len(queues))} if len(set(queues)) == 1 else group_by_queue(queues)
        pushes = []
        for queue, positions in groups.items():
            ids = [batch.ids[i] for i in positions]
            args = b"[" + orjson.dumps(ids) + b",[" + b",".join(batch.events[i] for i in positions) + b"]]"
            envelope = self._template(queue, batch.ignored).fill(
                new_task_id(), args, f"[{len(ids)} events]", enqueued_at=batch.opened
            )
            pushes.append((queue, [envelope]))
        batch.ids, batch.events, batch.models = [], [], []
        return pushes

    def _template(self, queue: str, ignored: bool) -> EnvelopeTemplate:
        template = self._templates.get((queue, ignored))
        if template is None:
            template = EnvelopeTemplate(TASK_TRAIN_BATCH, queue, ignore_result=ignored)
            self._templates[queue, ignored] = template
        return template

    def finished(self, batch: _Batch, error: BaseException | None) -> None:
        """The batch's send is over: in Redis (``error`` None, or a ``ReplicationError``: in Redis
        on too few replicas, its handles live) or failed for good."""
        if isinstance(error, ReplicationError):
            batch.short, error = error, None
            self._short.append(batch)
        batch.error = error
        batch.event_ids = []
        if error is not None:
            self._errors.append(error)
        self.sending.discard(batch)
        batch.sent.set()

    def shortfall(self, handles: Sequence[Any] | None = None) -> ReplicationError | None:
        """The replication shortfalls not reported yet (of the batches of ``handles``, or all) as
        one ``ReplicationError`` naming all their events; they count as reported now."""
        if handles is None:
            taken, self._short = self._short, []
        else:
            of = {id(h._batch) for h in handles if isinstance(h, LingerHandle)}
            taken = [b for b in self._short if id(b) in of]
            self._short = [b for b in self._short if id(b) not in of]
        errors = [b.short for b in taken if b.short is not None]
        return merge_shortfalls(errors) if errors else None

    def first_error(self) -> BaseException | None:
        """The first send that failed since the last call (a note counts the others)."""
        errors, self._errors = self._errors, []
        if not errors:
            return None
        first = errors[0]
        if len(errors) > 1:
            first.add_note(f"{len(errors) - 1} more linger batch(es) of this client failed too")
        return first

    def failure(self) -> BaseException | None:
        """What ``flush()`` and ``close()`` raise: the first failed send (a note names any
        replication shortfall beside it), else the shortfalls not reported yet, else None."""
        error = self.first_error()
        short = self.shortfall()
        if error is not None and short is not None:
            error.add_note(f"and: {short}")
        return error if error is not None else short


def merge_shortfalls(errors: Sequence[ReplicationError]) -> ReplicationError:
    """One ``ReplicationError`` for several pushes: every event id, the fewest replicas seen."""
    if len(errors) == 1:
        return errors[0]
    ids = [event_id for e in errors for event_id in e.event_ids]
    return ReplicationError(
        f"{len(errors)} pushes of {len(ids)} event(s) were acknowledged by too few replicas; "
        f"the first: {errors[0]}",
        wanted=max(e.wanted for e in errors),
        got=min(e.got for e in errors),
        event_ids=ids,
    )


def send_error(handles: Sequence[Any]) -> BaseException | None:
    """The send error of the first of ``handles`` whose (sent) batch failed, or None."""
    for handle in handles:
        if isinstance(handle, LingerHandle) and handle._batch.error is not None:
            return handle._batch.error
    return None


class Linger:
    """The buffers of one client, sent by a thread of their own; ``add`` from any thread."""

    _lock: threading.Lock
    _wake: threading.Condition
    _buffers: LingerBuffers
    _make_buffers: Callable[[], LingerBuffers]
    _thread: threading.Thread | None

    def __init__(
        self,
        publish: Callable[[Build, list[str]], None],
        app: Celery,
        *,
        queue: str,
        linger_ms: float,
        max_events: int,
        max_message_bytes: int,
    ) -> None:
        self._publish = publish
        self._make_buffers = lambda: LingerBuffers(
            app, queue=queue, linger_ms=linger_ms, max_events=max_events, max_message_bytes=max_message_bytes
        )
        self._reset()
        self._closed = False
        _live.add(self)
        # Weakly: a client dropped without close() must not be kept alive until exit.
        ref = weakref.ref(self)

        def flush_at_exit() -> None:
            linger = ref()
            if linger is not None:
                linger._flush()  # (nothing to raise to at exit)

        self._at_exit = flush_at_exit
        atexit.register(flush_at_exit)

    def add(
        self, task_id: str, data: bytes, event_id: str, *, ignored: bool, model: str = DEFAULT_MODEL
    ) -> LingerHandle:
        """Buffer one validated event (its JSON, id and model) under result id ``task_id``."""
        weight = self._buffers.weigh(data)
        with self._lock:
            if self._closed:
                raise PublishError("the client is closed: nothing was enqueued")
            handle, full, opened = self._buffers.put(
                task_id, data, event_id, weight, ignored=ignored, model=model
            )
            if opened:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="itrain-linger", daemon=True)
                    self._thread.start()
                else:
                    self._wake.notify()  # a new deadline for the sending thread
        for done in full:
            self._send(done)
        return handle

    def flush(self) -> None:
        """Send every buffered event now and wait for sends under way. Raises the replication
        shortfalls not reported yet (one ``ReplicationError``); a failed send's error goes to its
        handles (and to ``close()``), it is not raised here."""
        self._flush()
        with self._lock:
            short = self._buffers.shortfall()
        if short is not None:
            raise short

    def _flush(self) -> None:
        with self._lock:
            # Sends under way first: a flush that sent its batch beside one the sending thread
            # had taken just before put the later events in the queue ahead of the earlier ones
            # (seen on a loaded host: a 2 ms linger expired between two calls).
            waiting = list(self._buffers.sending)
            taken = self._buffers.take_all()
        for batch in waiting:
            batch.sent.wait()
        for batch in taken:
            self._send(batch)

    def settle(self, handles: Sequence[Any]) -> None:
        """Flush, then raise the send error of the first of ``handles`` whose batch failed, or
        the replication shortfall of their batches."""
        self._flush()
        for handle in handles:
            if isinstance(handle, LingerHandle):
                handle._batch.sent.wait()
        error = send_error(handles)
        if error is not None:
            raise error
        with self._lock:
            short = self._buffers.shortfall(handles)
        if short is not None:
            raise short

    def close(self) -> None:
        """Flush and stop; raises the first error of a send that failed since the last close()
        (a note counts the others), else the replication shortfalls not reported yet."""
        with self._lock:
            self._closed = True
        self._flush()
        atexit.unregister(self._at_exit)
        with self._lock:
            self._wake.notify()  # nothing left and closed: the sending thread ends
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            failure = self._buffers.failure()
        if failure is not None:
            raise failure

    # -- internals -------------------------------------------------------------------------------

    def _reset(self) -> None:
        # Also in a forked child: the lock may have been held by a thread that is not there.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._buffers = self._make_buffers()
        self._thread = None

    def _send(self, batch: _Batch) -> None:
        error: BaseException | None = None
        try:
            self._publish(functools.partial(self._buffers.messages, batch), batch.event_ids)
        except Exception as exc:
            error = exc
        finally:
            with self._lock:
                self._buffers.finished(batch, error)

    def _run(self) -> None:
        """The sending thread: sends each buffer when its oldest event has waited long enough."""
        while True:
            with self._lock:
                due = self._wait_for_due()
                if due is None:
                    self._thread = None
                    return
            for batch in due:
                self._send(batch)

    def _wait_for_due(self) -> list[_Batch] | None:
        # Under the lock; None when the thread should end (closed, or idle for a while).
        idle_until = time.monotonic() + _IDLE_SECONDS
        while True:
            now = time.monotonic()
            deadline = self._buffers.next_deadline()
            if deadline is None:
                if self._closed or now >= idle_until:
                    return None
                self._wake.wait(idle_until - now)
                continue
            due = self._buffers.take_due(now)
            if due:
                return due
            self._wake.wait(deadline - now)


_live: weakref.WeakSet[Linger] = weakref.WeakSet()


def _after_fork() -> None:
    for linger in list(_live):
        linger._reset()


os.register_at_fork(after_in_child=_after_fork)
