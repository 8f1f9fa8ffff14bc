"""Job handles: Celery ``AsyncResult`` objects that are cheap to make by the hundred thousand.

``AsyncResult.__init__`` builds a weak-referencing promise for every handle, and its ``__del__``
tells the backend to stop waiting for it; together about 30 µs a handle, more than publishing
the event. ``train_many`` hands out one handle per event, most of which are never waited on, so
here the promise is made on first use and a handle nobody waited on is dropped for free. In
every other respect it is an ``AsyncResult``: ``get()``, ``ready()``, ``state``, ``then()``.

``ChunkHandle`` is the handle of one event of a ``train_many`` chunk, whose result is an entry of
the chunk's one result (``producer.chunks``): its id is ``<chunk id>:<index>``, and it reads and
waits on the chunk's key. The handles of one chunk share a ``Chunk``, so the chunk's result is
fetched and decoded once for all of them.
"""

from __future__ import annotations

from typing import Any

import orjson
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from vine import promise

from producer.chunks import event_meta, handle_id, parse_handle_id
from producer.errors import ResultTimeoutError
from producer.protocol import result_key

__all__ = ["AppResult", "Chunk", "ChunkHandle", "JobHandle", "handle_for", "timed_out"]


def timed_out(task_id: str, timeout: float | None) -> ResultTimeoutError:
    """The error of a handle whose result was not ready within ``timeout`` seconds."""
    within = f"within {timeout:g} s" if timeout is not None else "in time"
    return ResultTimeoutError(f"the result of job {task_id} was not ready {within}")


class _OurTimeout(AsyncResult):  # type: ignore[misc]
    """``get()`` raises ``ResultTimeoutError`` (ours, and Celery's ``TimeoutError``) on timeout."""

    def get(self, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get(timeout, *args, **kwargs)
        except ResultTimeoutError:
            raise
        except CeleryTimeoutError:
            raise timed_out(self.id, timeout) from None


class JobHandle(_OurTimeout):
    def __init__(self, id: str, app: Celery, *, ignored: bool = False, backend: Any = None) -> None:
        self.app = app
        self.id = id
        # ``backend``: the app's, when the caller already has it (Celery's ``app.backend`` is a
        # thread-local lookup, a third of the cost of a handle).
        self.backend = backend if backend is not None else app.backend
        self.parent = None
        self._cache = None
        # Celery's mark for a task sent with ignore_result: get() returns None at once, and
        # state stays PENDING (no result is ever written).
        self._ignored = ignored

    @property
    def key(self) -> str:
        """The Redis key its result is written under."""
        return result_key(self.id)

    @property
    def on_ready(self) -> Any:
        p = self.__dict__.get("_on_ready")
        if p is None:
            p = self.__dict__["_on_ready"] = promise(self._on_fulfilled, weak=True)
        return p

    @on_ready.setter
    def on_ready(self, value: Any) -> None:
        self.__dict__["_on_ready"] = value

    def __del__(self) -> None:
        # Only a handle that was waited on is known to the backend.
        if "_on_ready" in self.__dict__:
            super().__del__()


class Chunk:
    """The shared part of a chunk's handles: its id, and its meta once ready."""

    __slots__ = ("_waiter", "app", "backend", "id", "meta")

    def __init__(self, chunk_id: str, app: Celery) -> None:
        self.id = chunk_id
        self.app = app
        #: The app's result backend, looked up once for all the chunk's handles.
        self.backend = app.backend
        #: The chunk's decoded result meta, once ready (SUCCESS or FAILURE).
        self.meta: dict[str, Any] | None = None
        self._waiter: JobHandle | None = None

    def read(self) -> dict[str, Any] | None:
        """The chunk's meta if it is ready, read from Redis at most until it is."""
        if self.meta is None:
            # The stored JSON, not the backend's decoded meta (which rebuilds a FAILURE's
            # exception): event entries are read from the stored form.
            raw = self.app.backend.get(result_key(self.id))
            meta = orjson.loads(raw) if raw is not None else None
            if isinstance(meta, dict) and meta.get("status") in states.READY_STATES:
                self.meta = meta
        return self.meta

    def wait(self, timeout: float | None, interval: float) -> dict[str, Any]:
        """The chunk's meta, waiting for it as ``AsyncResult.get()`` does (Celery's result
        subscription wakes it when the chunk's result lands); ``ResultTimeoutError`` after
        ``timeout`` seconds."""
        if self.read() is None:
            if self._waiter is None:
                self._waiter = JobHandle(self.id, self.app)
            self._waiter.get(timeout=timeout, propagate=False, interval=interval, disable_sync_subtasks=False)
            if self.read() is None:  # expired at once, or not a result of ours
                message = f"the result of chunk {self.id} was announced but cannot be read"
                error = {"exc_type": "ItrainError", "exc_message": [message], "exc_module": "producer.errors"}
                self.meta = {"status": states.FAILURE, "result": error}
        assert self.meta is not None
        return self.meta


class ChunkHandle(JobHandle):
    """The handle of event ``index`` of a ``train_many`` chunk; an ``AsyncResult`` in every way."""

    def __init__(self, chunk: Chunk, index: int, *, ignored: bool = False) -> None:
        super().__init__(handle_id(chunk.id, index), chunk.app, ignored=ignored, backend=chunk.backend)
        self.chunk = chunk
        self.index = index

    @property
    def key(self) -> str:
        return result_key(self.chunk.id)

    def _get_task_meta(self) -> Any:
        if self._cache is None:
            chunk = self.chunk.read()
            if chunk is None:
                return {"status": states.PENDING, "result": None, "task_id": self.id}
            return self._maybe_set_cache(event_meta(chunk, self.index, self.id))
        return self._cache

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        callback: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.ignored:
            return None
        if self._cache is None:
            try:
                self.chunk.wait(timeout, interval)
            except ResultTimeoutError:
                raise timed_out(self.id, timeout) from None
        self._get_task_meta()
        return self.maybe_throw(propagate=propagate, callback=callback)


def handle_for(task_id: str, app: Celery) -> JobHandle:
    """The handle of a job from its id: a ``ChunkHandle`` for a chunk event's id
    (``<chunk id>:<index>``), a ``JobHandle`` for any other."""
    parsed = parse_handle_id(task_id)
    if parsed is None:
        return JobHandle(task_id, app)
    return ChunkHandle(Chunk(parsed[0], app), parsed[1])


class AppResult(_OurTimeout):
    """The producer app's ``app.AsyncResult(id)``: Celery's, except that a chunk event's id
    (``<chunk id>:<index>``) gives that event's ``ChunkHandle``, so a handle remade from its id
    anywhere works as the one ``train_many`` returned."""

    app: Celery

    @property
    def key(self) -> str:
        """The Redis key its result is written under."""
        return result_key(self.id)

    def __new__(cls, id: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(id, str) and parse_handle_id(id) is not None:
            return handle_for(id, kwargs.get("app") or cls.app)
        return super().__new__(cls)
