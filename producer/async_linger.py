"""Linger for ``AsyncTrainingClient``: the same buffers and messages as ``producer.linger``,
sent by the event loop instead of a thread.

A batch is sent when its oldest event has waited ``linger_ms`` (a timer of the loop), at once
when it is full (by the ``await client.train_step(...)`` that filled it, which so feels the
back-pressure), and on ``flush()``/``aclose()``. There is no exit hook: a loop that ends cannot
send anything, so the client must be closed (``async with``, or ``await client.aclose()``).
A ``ReplicationError`` (too few replicas acknowledged a batch) comes from ``flush()``,
``aclose()`` and ``wait_all``, as with the sync client; the handles stay live.

Batches reach the queue in the order they were started, as the sync client's one sending thread
sends them: each send waits for the one started before it. Sent side by side, a batch the timer
started and the next one, filled by ``train_step`` or taken by ``flush()``, could go on two
connections and the later events be queued first.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from producer.errors import PublishError
from producer.linger import Build, LingerBuffers, LingerHandle, _Batch, send_error
from producer.routes import DEFAULT_MODEL

__all__ = ["AsyncLinger"]


class AsyncLinger:
    """The buffers of one asyncio client; used from its event loop only."""

    def __init__(
        self, publish: Callable[[Build, list[str]], Awaitable[None]], buffers: LingerBuffers
    ) -> None:
        self._publish = publish
        self._buffers = buffers
        self._timer: asyncio.TimerHandle | None = None
        self._sends: set[asyncio.Task[None]] = set()
        #: The send started last: the next one waits for it (see the module's docstring).
        self._last: asyncio.Task[None] | None = None
        self._closed = False

    async def add(
        self, task_id: str, data: bytes, event_id: str, *, ignored: bool, model: str = DEFAULT_MODEL
    ) -> LingerHandle:
        """Buffer one validated event (its JSON, id and model) under result id ``task_id``."""
        weight = self._buffers.weigh(data)
        if self._closed:
            raise PublishError("the client is closed: nothing was enqueued")
        handle, full, opened = self._buffers.put(
            task_id, data, event_id, weight, ignored=ignored, model=model
        )
        if opened:
            self._arm()
        if full:
            await asyncio.gather(*(self._start(batch) for batch in full))
        return handle

    async def flush(self) -> None:
        """Send every buffered event now and wait for sends under way. Raises the replication
        shortfalls not reported yet (one ``ReplicationError``); a failed send's error goes to its
        handles (and to ``aclose()``), it is not raised here."""
        await self._flush()
        short = self._buffers.shortfall()
        if short is not None:
            raise short

    async def _flush(self) -> None:
        for batch in self._buffers.take_all():
            self._start(batch)
        while self._sends:
            await asyncio.gather(*list(self._sends))

    async def settle(self, handles: Sequence[Any]) -> None:
        """Flush, then raise the send error of the first of ``handles`` whose batch failed, or
        the replication shortfall of their batches."""
        if any(isinstance(h, LingerHandle) for h in handles):
            await self._flush()
            error = send_error(handles)
            if error is not None:
                raise error
            short = self._buffers.shortfall(handles)
            if short is not None:
                raise short

    async def aclose(self) -> None:
        """Flush and stop; raises the first error of a send that failed since the last close,
        else the replication shortfalls not reported yet."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._flush()
        failure = self._buffers.failure()
        if failure is not None:
            raise failure

    # -- internals -------------------------------------------------------------------------------

    def _arm(self) -> None:
        """A timer for the earliest deadline of the open batches (none when nothing is open)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._buffers.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_due)

    def _on_due(self) -> None:
        self._timer = None
        for batch in self._buffers.take_due(time.monotonic()):
            self._start(batch)
        self._arm()

    def _start(self, batch: _Batch) -> asyncio.Task[None]:
        # Every send is a task the client keeps, so flush() and aclose() can wait for all.
        task = asyncio.get_running_loop().create_task(self._send(batch, self._last))
        self._last = task
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return task

    async def _send(self, batch: _Batch, before: asyncio.Task[None] | None) -> None:
        error: BaseException | None = None
        try:
            if before is not None and not before.done():
                await asyncio.wait([before])  # its outcome is its own handles' (never raised here)
            await self._publish(functools.partial(self._buffers.messages, batch), batch.event_ids)
        except Exception as exc:
            error = exc
        finally:
            self._buffers.finished(batch, error)
