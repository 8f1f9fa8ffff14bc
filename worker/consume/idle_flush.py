"""Write what a pool process keeps for its next round trip once it has gone idle.

A batch's results ride in its commit's round trip, and the lock's timings of a critical section
ride in the next one that goes to Redis (``runtime.run_messages``). While jobs keep coming that
is a commit a few milliseconds later; when they stop, the last section's timings would wait for
the next job, and the exporter's lock histograms would lag by it. ``IdleFlush`` calls its
``flush`` once ``delay`` seconds have passed without a job: never while a stream keeps the
process busy (each job moves the deadline on), and once after its last job.

The thread is started on first use, in the process that uses it (a pool process forks from the
worker's main process, which never trains).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = ["IdleFlush"]

logger = logging.getLogger("itrain.idle_flush")


class IdleFlush:
    """Calls ``flush`` ``delay`` seconds after the last ``touch``, from a daemon thread."""

    def __init__(self, flush: Callable[[], None], delay: float) -> None:
        if delay <= 0:
            raise ValueError(f"an idle flush needs a delay > 0 s, not {delay}")
        self._flush = flush
        self.delay = delay
        self._cond = threading.Condition()
        #: When to flush (monotonic), or None when nothing waits.
        self._due: float | None = None
        self._pid: int | None = None

    def touch(self) -> None:
        """A job left something to flush: flush it ``delay`` seconds from now, unless another
        job comes first (and touches again)."""
        with self._cond:
            idle, self._due = self._due is None, time.monotonic() + self.delay
            if self._pid != os.getpid():  # (a thread does not survive a fork)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="itrain-idle-flush", daemon=True).start()
            elif idle:
                # Only a thread with nothing due needs waking; one waiting for an earlier deadline
                # finds the later one when it wakes, and waits again (no wake-up per job).
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._due is None:
                    self._cond.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._due = None
                self._cond.release()
                try:
                    self._flush()
                except Exception as exc:  # statistics: logged, never fatal to the process
                    logger.warning("could not write what waited for an idle moment: %r", exc)
                finally:
                    self._cond.acquire()
