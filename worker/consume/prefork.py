"""Celery's prefork pool, keeping a result it has half read across a consumer reconnect.

The main process reads each pool process's results from a pipe on the event loop: a 4-byte size,
then the pickled result. When only part of a result has arrived, the reading generator is left
registered as the pipe's reader and resumed when more arrives. On a connection error inside the
event loop, Celery 5.7 calls ``hub.reset()``, which unregisters every reader, that generator
included, and the pool registers a fresh reader when the consumer reconnects. That one read the
rest of the half-read result as the next size and waited for a body that never came: no result
of that process was read again, so its job never ended in the main process (``Turns`` kept the
pool counted busy) while the process itself sat idle, waiting for a job. It took a result
written in two parts (the size, then the body) with the main process reading in between, and a
reconnect then: seen in ~1 of 4 runs of ``itrain failover`` under a stream of events on a loaded
machine (tests/integration/test_failover_command.py).

Here the reader of each pipe keeps its half-read result itself, so the reader registered after a
reconnect resumes it where it stopped. ``worker.consume.app`` makes this the worker's pool
(``worker_pool``; ``-P prefork`` means it too); ``-P solo`` and ``-P threads`` are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from celery.concurrency import asynpool, prefork

__all__ = ["AsynPool", "TaskPool"]


class _ResultHandler(asynpool.ResultHandler):  # type: ignore[misc]
    """Celery's, whose reader resumes a result it had half read (see the module's docstring)."""

    #: fd -> (the pipe it was read from, the generator reading it): a result not read whole yet.
    _partial: dict[int, tuple[Any, Generator[None, None, None]]]

    def _make_process_result(self, hub: Any) -> Callable[[int], None]:
        # Called at each (re)connect with the new loop's methods; what is half read stays.
        if not hasattr(self, "_partial"):
            self._partial = {}
        partial = self._partial
        fileno_to_outq = self.fileno_to_outq
        on_state_change = self.on_state_change
        add_reader = hub.add_reader
        remove_reader = hub.remove_reader
        recv_message = self._recv_message

        def on_result_readable(fileno: int) -> None:
            try:
                outq = fileno_to_outq[fileno]
            except KeyError:  # process gone
                partial.pop(fileno, None)
                return remove_reader(fileno)  # type: ignore[no-any-return]
            held = partial.pop(fileno, None)
            # Only the same pipe's: a new process may have been given the same fd number.
            if held is not None and held[0] is outq:
                it = held[1]
            else:
                it = recv_message(add_reader, fileno, on_state_change)
            try:
                next(it)
            except StopIteration:  # read whole (or, resumed, finished by the loop meanwhile)
                pass
            except (OSError, EOFError):
                remove_reader(fileno)
            else:
                partial[fileno] = (outq, it)
                add_reader(fileno, it)

        return on_result_readable


class AsynPool(asynpool.AsynPool):  # type: ignore[misc]
    ResultHandler = _ResultHandler


class TaskPool(prefork.TaskPool):  # type: ignore[misc]
    """The prefork pool (``-P prefork``) with ``AsynPool`` above."""

    Pool = AsynPool
