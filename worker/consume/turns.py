"""Pool jobs taking turns by queue, so that a flooded queue cannot hold the pool.

Celery's pool runs jobs in the order they were handed to it, and holds every job it cannot start
yet: a worker whose one queue is flooded used to give the pool hundreds of that queue's batches
while another queue's lone event waited behind all of them. ``Turns`` hands the pool at most one
job per pool process and keeps the rest itself, one line per queue; whenever a process frees,
the next job comes from the next queue that has one (round-robin). A queue's own jobs keep their
order. The cost is one main-process turn between a job's end and the next job's start.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = ["Turns", "turns_for"]

#: (function, args, callback, error callback) of one pool job.
_Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], None], Callable[[Any], None]]


class Turns:
    """Round-robin by queue in front of a Celery pool (``apply_async`` with both callbacks)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        #: Jobs the pool holds (running, or about to): at most one per pool process.
        self.running = 0
        #: Each queue's waiting jobs; the dict's order is the turn order.
        self.waiting: dict[str, deque[_Job]] = {}
        # Callbacks come on the event loop; timers may run in their own thread (solo, threads).
        self.lock = threading.Lock()

    def limit(self) -> int:
        """Pool processes now (autoscaling changes it)."""
        try:
            return max(1, int(self.pool.num_processes))
        except (AttributeError, TypeError, ValueError):
            return 1

    def waiting_jobs(self) -> int:
        with self.lock:
            return sum(len(jobs) for jobs in self.waiting.values())

    def submit(
        self,
        queue: str,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        callback: Callable[[Any], None],
        error_callback: Callable[[Any], None],
    ) -> None:
        """Run ``function(*args)`` in the pool when it is ``queue``'s turn."""
        with self.lock:
            self.waiting.setdefault(queue, deque()).append((function, args, callback, error_callback))
        self.pump()

    def pump(self) -> None:
        """Hand the pool jobs while it has a free process, one queue after another."""
        limit = self.limit()
        while True:
            with self.lock:
                if self.running >= limit or not self.waiting:
                    return
                queue = next(iter(self.waiting))
                jobs = self.waiting.pop(queue)
                job = jobs.popleft()
                if jobs:  # back of the line: the next queue's turn
                    self.waiting[queue] = jobs
                self.running += 1
            function, args, callback, error_callback = job
            try:
                self.pool.apply_async(
                    function,
                    args=args,
                    callback=partial(self._done, callback),
                    error_callback=partial(self._done, error_callback),
                )
            except BaseException:
                with self.lock:
                    self.running -= 1
                raise

    def _done(self, then: Callable[[Any], None], value: Any) -> None:
        with self.lock:
            self.running = max(0, self.running - 1)
        try:
            then(value)
        finally:
            self.pump()


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
