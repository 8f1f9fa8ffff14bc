"""Per-event job results, written straight into Celery's Redis result backend.

A ``train_many`` chunk or a micro-batch trains many events in one task, yet every event has its
own ``AsyncResult``. Each result is stored exactly as Celery's Redis backend stores a task's
(``SETEX celery-task-meta-<id>`` and a ``PUBLISH`` on the same name, which wakes any
``AsyncResult.get()`` waiting on it), all in one pipelined round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import redis

from producer.protocol import result_key

__all__ = ["Outcome", "failure_payload", "write_results"]

Status = Literal["SUCCESS", "FAILURE"]


class Outcome:
    """The end of one job: its result object, or the error that failed it."""

    __slots__ = ("result", "status", "task_id")

    def __init__(self, task_id: str, status: Status, result: dict[str, Any]) -> None:
        self.task_id = task_id
        self.status = status
        self.result = result

    @classmethod
    def success(cls, task_id: str, result: dict[str, Any]) -> Outcome:
        return cls(task_id, "SUCCESS", result)

    @classmethod
    def failure(cls, task_id: str, exc: BaseException) -> Outcome:
        return cls(task_id, "FAILURE", failure_payload(exc))

    def __repr__(self) -> str:
        return f"Outcome({self.task_id!r}, {self.status}, {self.result!r})"


def failure_payload(exc: BaseException) -> dict[str, Any]:
    """Celery's JSON form of an exception; ``AsyncResult.get()`` raises it again on the caller."""
    return {
        "exc_type": type(exc).__name__,
        "exc_message": [str(exc)],
        "exc_module": type(exc).__module__,
    }


def write_results(client: redis.Redis, outcomes: Sequence[Outcome], expires: int) -> None:
    if not outcomes:
        return
    done = datetime.now(UTC).isoformat()
    pipe = client.pipeline(transaction=False)
    for o in outcomes:
        key = result_key(o.task_id)
        value = orjson.dumps(
            {
                "status": o.status,
                "result": o.result,
                "traceback": None,
                "children": [],
                "date_done": done,
                "task_id": o.task_id,
            }
        )
        pipe.setex(key, expires, value)
        pipe.publish(key, value)
    pipe.execute()
