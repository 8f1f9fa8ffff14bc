"""The end of one job: its result (``Outcome``) and, for a failure, its dead-letter record.

Plain data, shared by the engine's batch phases (which decide each job's outcome), the training
loop, the consumer and the result writer (``worker.store.results``), so none of them imports
another's I/O to name it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

__all__ = ["Outcome", "Status", "dead_letter_entry", "deliveries_known", "failure_payload"]

#: How many deliveries each task id's message had, while ``deliveries_known`` says so. A job
#: carries no delivery count: giving every job one would cost on every event for a figure only a
#: dead letter needs, and the engine makes dead letters deep below the loop that knows it.
_DELIVERIES: ContextVar[Mapping[str, int] | None] = ContextVar("itrain_deliveries", default=None)

Status = Literal["SUCCESS", "FAILURE"]


class Outcome:
    """The end of one job: its result object, or the error that failed it, and the event it answers.

    ``event_id`` is taken from a SUCCESS result's ``event_id`` when not given; a FAILURE knows it
    only when the caller says (``Outcome.failure(task_id, exc, event_id=...)``). A result with no
    known event may be replaced by ``trained`` (the precedence rule of ``worker.store.results``).
    """

    __slots__ = ("event_id", "keep_existing", "result", "status", "stored", "task_id")

    def __init__(
        self,
        task_id: str,
        status: Status,
        result: dict[str, Any],
        *,
        keep_existing: bool = False,
        event_id: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.result = result
        #: Kept for callers: every result is now write-once (``keep_existing`` always holds), with
        #: the one exception of ``trained`` replacing a lesser result of the same event.
        self.keep_existing = keep_existing
        if event_id is None and status == "SUCCESS":
            found = result.get("event_id")
            event_id = found if isinstance(found, str) else None
        self.event_id = event_id
        #: Already written: its batch's results rode in the commit's round trip (``Trainer``).
        self.stored = False

    @classmethod
    def success(cls, task_id: str, result: dict[str, Any]) -> Outcome:
        return cls(task_id, "SUCCESS", result)

    @classmethod
    def duplicate(cls, task_id: str, model: str, event_id: str) -> Outcome:
        result = {"status": "duplicate", "model": model, "event_id": event_id}
        return cls(task_id, "SUCCESS", result, keep_existing=True)

    @classmethod
    def failure(cls, task_id: str, exc: BaseException, *, event_id: str | None = None) -> Outcome:
        return cls(task_id, "FAILURE", failure_payload(exc), event_id=event_id)

    @property
    def trained(self) -> bool:
        """Whether this result says the event is in the weights (it may replace a lesser one)."""
        return self.status == "SUCCESS" and self.result.get("status") == "trained"

    def __repr__(self) -> str:
        return f"Outcome({self.task_id!r}, {self.status}, {self.result!r}, event_id={self.event_id!r})"


def failure_payload(exc: BaseException) -> dict[str, Any]:
    """Celery's JSON form of an exception; ``AsyncResult.get()`` raises it again on the caller."""
    return {
        "exc_type": type(exc).__name__,
        "exc_message": [str(exc)],
        "exc_module": type(exc).__module__,
    }


def dead_letter_entry(
    task_id: str,
    exc: BaseException,
    *,
    model: str | None = None,
    event_id: str | None = None,
    action_type: str | None = None,
    extra: dict[str, Any] | None = None,
    deliveries: int | None = None,
) -> bytes:
    """A dead-letter record: what failed and why. Never the raw user id, never the raw payload.

    ``deliveries``: how many times its message was delivered; by default the count
    ``deliveries_known`` holds for ``task_id`` (1 for one it does not name), or none outside it.
    """
    if deliveries is None:
        known = _DELIVERIES.get()
        deliveries = None if known is None else known.get(task_id, 1)
    entry: dict[str, Any] = {
        "task_id": task_id,
        "model": model,
        "event_id": event_id,
        "action_type": action_type,
        "error": type(exc).__name__,
        "reason": str(exc)[:1000],
        "at": datetime.now(UTC).isoformat(),
    }
    if deliveries is not None:
        entry["deliveries"] = deliveries
    if extra:
        entry.update(extra)
    return orjson.dumps(entry)


@contextmanager
def deliveries_known(counts: Mapping[str, int]) -> Iterator[None]:
    """Within it, dead letters record the delivery count ``counts`` gives their task id (a task id
    it does not name was delivered once)."""
    token = _DELIVERIES.set(counts)
    try:
        yield
    finally:
        _DELIVERIES.reset(token)
