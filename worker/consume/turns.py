"""Pool jobs taking turns by queue, so that a flooded queue cannot hold the pool.

Celery's pool runs jobs in the order they were handed to it, and holds every job it cannot start
yet: a worker whose one queue is flooded used to give the pool hundreds of that queue's batches
while another queue's lone event waited behind all of them. ``Turns`` hands the pool at most one
job per pool process (and one more while a single queue is active, so that a process never
idles for the main process's turn between two jobs) and keeps the rest itself, one line per
queue; whenever a process frees,
the next job comes from the next queue that has one (round-robin). A turn takes as much of its
queue's line as one job may hold (the micro-batches of one strategy that wait together merge,
up to ``ITRAIN_BATCH_MAX`` events): a queue of lone ``train_step`` events gets a job's worth of
events per turn, not one event per turn. While more than one queue has had messages within
``SHARED_FOR`` seconds, no queue holds every pool process (one stays for the others' jobs,
unless the pool has only one), and a job holds at most a ``SHARED_DIVISOR``-th of a job's events
(one message at least): a lone event of a quiet queue starts at once, or after a short job of
the flooded one, at the cost of the flood's rate while others are active. A queue's own
messages keep their order. The cost is one main-process turn between a job's end and the next
job's start.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

__all__ = [
    "SHARED_DIVISOR",
    "SHARED_FOR",
    "JobOwner",
    "Turns",
    "dropped",
    "pool_has_room",
    "turns_for",
    "when_room",
]

logger = logging.getLogger("itrain.turns")

#: Seconds after its last message during which a queue counts as active.
SHARED_FOR = 10.0
#: While several queues are active, a job holds at most ``max // SHARED_DIVISOR`` events.
SHARED_DIVISOR = 4


class JobOwner(Protocol):
    """What hands ``Turns`` its micro-batches and starts them (``batching._Buffer``)."""

    #: Events one job may hold.
    max: int

    def start(self, items: list[Any], alone: bool, finished: Callable[[], None]) -> Any:
        """Hand ``items`` to the pool as one job; call ``finished`` once it ends either way.
        Returns the pool's handle of the job (``pool.apply_async``'s), or None."""


@dataclass(slots=True)
class _Entry:
    owner: JobOwner
    items: list[Any]
    #: Events each item counts for.
    unit: int
    #: A message run on its own (to find which one kills its process): never merged.
    alone: bool


def dropped(handle: Any) -> bool:
    """Whether the pool let go of the job of ``handle`` without running its callbacks.

    Celery's prefork pool does so when the consumer restarts after a lost broker connection:
    ``AsynPool.flush`` discards every job that no pool process has acknowledged yet (the job
    waiting for a free process, and, when the main process has not read the acknowledgement
    yet, the job a process is running), and the result of such a job is ignored when it comes.
    Counted as running forever, two such jobs held the only pool process of a worker: its main
    process fetched messages and never handed them on. A job still in the pool's cache, or
    done, is not dropped; a handle of another pool (solo, threads) never is."""
    cache = getattr(handle, "_cache", None)
    job = getattr(handle, "_job", None)
    if cache is None or job is None:
        return False
    try:
        return job not in cache and not handle.ready()
    except Exception:  # a handle of another kind: trust its callbacks
        return False


class _InPool:
    """A job handed to the pool: its ``finished`` runs once, from a callback or when the pool
    dropped the job."""

    __slots__ = ("done", "handle", "queue")

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.handle: Any = None
        self.done = False


class Turns:
    """Round-robin by queue in front of a Celery pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        #: Jobs the pool holds (running, or about to): at most one per pool process.
        self.running = 0
        #: The same, by queue.
        self.running_by: dict[str, int] = {}
        #: Each queue's waiting micro-batches.
        self.waiting: dict[str, deque[_Entry]] = {}
        #: The turn number each queue was last served at: the next turn goes to the queue served
        #: longest ago (a queue new to the pool first), so one that has just run waits for the rest.
        self.served: dict[str, int] = {}
        self.turn = 0
        #: When each queue last handed in a micro-batch (monotonic seconds).
        self.last_seen: dict[str, float] = {}
        #: The jobs counted in ``running``, with the pool's handles: see ``dropped``.
        self.in_pool: set[_InPool] = set()
        # Callbacks come on the event loop; timers may run in their own thread (solo, threads).
        self.lock = threading.Lock()

    def limit(self) -> int:
        """Pool processes now (autoscaling changes it)."""
        try:
            return max(1, int(self.pool.num_processes))
        except (AttributeError, TypeError, ValueError):
            return 1

    def has_room(self) -> bool:
        """Whether a job handed in now would start at once: a pool process is free and no job
        waits for one."""
        with self.lock:
            return not self.waiting and self.running < self.limit()

    def submit(
        self, queue: str, owner: JobOwner, items: list[Any], unit: int, *, alone: bool = False
    ) -> None:
        """Run ``items`` (each counting ``unit`` events) in the pool when it is ``queue``'s turn."""
        with self.lock:
            self.waiting.setdefault(queue, deque()).append(_Entry(owner, items, unit, alone))
            self.last_seen[queue] = time.monotonic()
        self.pump()

    def _shared(self) -> bool:
        """Whether more than one queue has had messages within ``SHARED_FOR`` seconds."""
        since = time.monotonic() - SHARED_FOR
        for queue in [q for q, seen in self.last_seen.items() if seen < since]:
            del self.last_seen[queue]
            if queue not in self.waiting and not self.running_by.get(queue):
                self.served.pop(queue, None)  # bounded by the queues active now
        return len(self.last_seen) > 1

    def pump(self) -> None:
        """Hand the pool jobs while it has a free process, one queue after another."""
        processes = self.limit()
        while True:
            with self.lock:
                shared = self._shared()
                # Alone, one job more waits in the pool, ready for the first process that frees.
                limit = processes if shared else processes + 1
                if not self.waiting:
                    return
                if self.running >= limit and (not self._forget_dropped() or self.running >= limit):
                    return
                # While several queues are active, one process stays for the others' jobs.
                most = max(1, processes - 1) if shared else limit
                ready = [q for q in self.waiting if self.running_by.get(q, 0) < most]
                if not ready:
                    return
                queue = min(ready, key=lambda q: self.served.get(q, -1))
                line = self.waiting[queue]
                job = self._take(line, SHARED_DIVISOR if shared else 1)
                if not line:
                    del self.waiting[queue]
                self.turn += 1
                self.served[queue] = self.turn
                self.running += 1
                self.running_by[queue] = self.running_by.get(queue, 0) + 1
                entry = _InPool(queue)
                self.in_pool.add(entry)
            finished = partial(self._finished, entry)
            try:
                handle = job.owner.start(job.items, job.alone, finished)
            except BaseException:
                finished()
                raise
            if not entry.done:  # a pool without an event loop may have run it already
                entry.handle = handle

    def _forget_dropped(self) -> bool:
        """Stop counting the jobs the pool dropped (``dropped``); whether there were any. Called
        with the lock held, when the pool looks full: after a reconnect the next message finds
        the processes free again."""
        gone = [entry for entry in self.in_pool if not entry.done and dropped(entry.handle)]
        for entry in gone:
            self._release(entry)
        if gone:
            logger.warning(
                "%d pool job(s) dropped by the pool at a broker reconnect; their messages come "
                "back from the broker",
                len(gone),
            )
        return bool(gone)

    @staticmethod
    def _take(line: deque[_Entry], divisor: int) -> _Entry:
        """The head of ``line``, merged with the micro-batches of the same owner after it, up to
        one job's events (``max // divisor``, one item at least); what does not fit stays."""
        head = line[0]
        if head.alone:
            return line.popleft()
        owner, unit = head.owner, head.unit
        room = max(1, owner.max // divisor // unit)  # items
        items: list[Any] = []
        while line and line[0].owner is owner and not line[0].alone and len(items) < room:
            entry = line[0]
            fits = room - len(items)
            items += entry.items[:fits]
            if fits >= len(entry.items):
                line.popleft()
            else:
                entry.items = entry.items[fits:]
        return _Entry(owner, items, unit, False)

    def _finished(self, entry: _InPool) -> None:
        """A job handed to the pool ended (its callbacks ran): the next turn."""
        with self.lock:
            if entry.done:  # already forgotten as dropped
                return
            self._release(entry)
        self.pump()
        if _room_waiters and self.has_room():
            waiters = list(_room_waiters)
            _room_waiters.clear()
            for callback in waiters:
                try:
                    callback()
                except Exception as exc:  # the transport's: its next tick retries (a lost link)
                    logger.warning("a wait for a free pool process could not start: %r", exc)

    def _release(self, entry: _InPool) -> None:
        """Count ``entry`` no more (the lock held)."""
        entry.done = True
        # The handle's callbacks hold ``finished``, which holds ``entry``: a reference cycle that
        # kept each job's messages (their kombu objects, ~100 per message) alive until the
        # garbage collector found it. Broken here, they go as soon as the pool lets go of the job.
        entry.handle = None
        self.in_pool.discard(entry)
        self.running = max(0, self.running - 1)
        left = self.running_by.get(entry.queue, 0) - 1
        if left > 0:
            self.running_by[entry.queue] = left
        else:
            self.running_by.pop(entry.queue, None)


_TURNS: weakref.WeakKeyDictionary[Any, Turns] = weakref.WeakKeyDictionary()


def turns_for(pool: Any) -> Turns:
    """The pool's one ``Turns``, shared by every training task's strategy (and kept when the
    consumer restarts after a lost connection, so that jobs still running are counted)."""
    try:
        turns = _TURNS.get(pool)
        if turns is None:
            turns = _TURNS[pool] = Turns(pool)
    except TypeError:  # a pool that cannot be weakly referenced: its own for this strategy
        turns = Turns(pool)
    return turns


def pool_has_room() -> bool:
    """Whether this process's pool would start a job at once (``Turns.has_room``; True before any
    training task's strategy made one). The transport asks before it gathers a fetch window: a
    worker whose pool is busy leaves the window to one whose pool is free, instead of taking
    messages that would wait for its own pool."""
    return all(turns.has_room() for turns in list(_TURNS.values()))


_room_waiters: list[Callable[[], None]] = []


def when_room(callback: Callable[[], None]) -> None:
    """Call ``callback`` (once, on the event loop) when a job of this process's pool ends and a
    process is free."""
    if callback not in _room_waiters:
        _room_waiters.append(callback)
