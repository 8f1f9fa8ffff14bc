"""Reading many job results in bulk (``wait_all`` of both clients), without I/O of its own.

A ``Collector`` says which result keys to read (``MGET`` batches of at most 5,000), decodes what
the caller read, and keeps what is still pending; the caller does the reads and the waiting
between rounds, with blocking calls (``TrainingClient``) or awaited ones (``AsyncTrainingClient``).
The handles of one ``train_many`` chunk share its key: each key is read and decoded once a round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from celery.result import AsyncResult

from producer.chunks import event_state, is_chunk_result
from producer.errors import ResultIgnoredError, ResultTimeoutError
from producer.handles import ChunkHandle
from producer.protocol import result_key

__all__ = ["Collector", "check_not_ignored", "result_key_of"]

_PENDING = object()
#: Keys per ``MGET``: large enough for few round trips, small enough not to hold Redis long.
_PART = 5000


def result_key_of(handle: AsyncResult) -> str:
    """Where a handle's result is stored: its chunk's key for a chunk event's handle."""
    key = getattr(handle, "key", None)
    return key if isinstance(key, str) else result_key(handle.id)


def check_not_ignored(handles: Sequence[AsyncResult]) -> None:
    """``ResultIgnoredError`` when any handle was sent with ``result=False`` (fire-and-forget):
    no result is ever written for it, so waiting on it would never end."""
    ignored = [i for i, h in enumerate(handles) if getattr(h, "ignored", False)]
    if ignored:
        raise ResultIgnoredError(
            f"{len(ignored)} of {len(handles)} handle(s) (the first at index {ignored[0]}) were "
            "sent with result=False (fire-and-forget): no result is written for them, so they "
            "cannot be waited on"
        )


class Collector:
    """The results of ``handles``, in order, as they are read: the result object, or the
    exception (rebuilt by ``backend``) of a failed job."""

    def __init__(self, handles: Sequence[AsyncResult], backend: Any, timeout: float) -> None:
        self.handles = handles
        self.timeout = timeout
        self._backend = backend
        self._results: list[Any] = [_PENDING] * len(handles)
        self._pending = list(range(len(handles)))
        self._still: list[int] = []
        self._keys = [result_key_of(h) for h in handles]  # once, not on every round
        self._deadline = time.monotonic() + timeout

    @property
    def done(self) -> bool:
        return not self._pending

    @property
    def results(self) -> list[Any]:
        return self._results

    def parts(self) -> Iterator[tuple[list[int], list[str]]]:
        """This round's reads: (handle indexes, distinct keys to ``MGET`` for them)."""
        pending = self._pending
        for start in range(0, len(pending), _PART):
            part = pending[start : start + _PART]
            yield part, list(dict.fromkeys([self._keys[i] for i in part]))

    def take(self, part: list[int], keys: list[str], values: Sequence[Any]) -> None:
        """Decode one ``MGET`` reply (``values`` for ``keys``) for the handles of ``part``."""
        stored = {k: orjson.loads(v) for k, v in zip(keys, values, strict=True) if v is not None}
        chunk_form = {k: is_chunk_result(meta) for k, meta in stored.items()}  # once a chunk
        for i in part:
            meta = stored.get(self._keys[i])
            if meta is None:
                self._still.append(i)
                continue
            h = self.handles[i]
            if isinstance(h, ChunkHandle):
                status, result = event_state(meta, h.index, h.id, checked=chunk_form[self._keys[i]])
            else:
                status, result = meta.get("status"), meta.get("result")
            if status == "SUCCESS":
                self._results[i] = result
            elif status == "FAILURE":
                self._results[i] = self._backend.exception_to_python(result)
            else:
                self._still.append(i)

    def end_round(self) -> None:
        """After every part of a round was taken: ``ResultTimeoutError`` when results are still
        pending past the timeout."""
        self._pending, self._still = self._still, []
        if self._pending and time.monotonic() > self._deadline:
            raise ResultTimeoutError(
                f"{len(self._pending)} of {len(self.handles)} job(s) still pending after {self.timeout:g} s"
            )
