"""Per-event job results, written straight into Celery's Redis result backend.

A ``train_many`` chunk or a micro-batch trains many events in one task, yet every event has its
own ``AsyncResult``. Each result is stored exactly as Celery's Redis backend stores a task's
(``SET celery-task-meta-<id> ... EX`` and a ``PUBLISH`` on the same name, which wakes any
``AsyncResult.get()`` waiting on it). One script call writes a whole batch: a round trip and a
command to encode instead of two commands per event, which cost more than training the event.

Each stored result names the event it answers (a top-level ``event_id`` in Celery's meta, which
Celery ignores), and the script (``lua/write_results.lua``) applies one precedence rule: results
are write-once, except that ``trained`` replaces an earlier FAILURE, ``skipped`` or ``duplicate``
of the same event; nothing replaces ``trained``, and a result is never written over one for a
different event. So a forged message naming another job's id cannot change that job's answer,
and a redelivery that trains an event after its lock_timeout FAILURE says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import redis

from producer.protocol import result_key
from worker.lua import load_lua

__all__ = ["Outcome", "failure_payload", "write_results"]

Status = Literal["SUCCESS", "FAILURE"]


class Outcome:
    """The end of one job: its result object, or the error that failed it, and the event it answers.

    ``event_id`` is taken from a SUCCESS result's ``event_id`` when not given; a FAILURE knows it
    only when the caller says (``Outcome.failure(task_id, exc, event_id=...)``). A result with no
    known event may be replaced by ``trained`` (see the module's precedence rule).
    """

    __slots__ = ("event_id", "keep_existing", "result", "status", "task_id")

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


def write_results(client: redis.Redis, outcomes: Sequence[Outcome], expires: int) -> int:
    """Write each outcome's result under the precedence rule; returns how many were written (the
    others were refused: an earlier result stands)."""
    if not outcomes:
        return 0
    done = datetime.now(UTC).isoformat()
    args: list[bytes | str | int] = [expires]
    for o in outcomes:
        args.append(result_key(o.task_id))
        args.append(
            orjson.dumps(
                {
                    "status": o.status,
                    "result": o.result,
                    "traceback": None,
                    "children": [],
                    "date_done": done,
                    "task_id": o.task_id,
                    "event_id": o.event_id,
                }
            )
        )
        args.append(o.event_id or "")
        args.append(1 if o.trained else 0)
    # ``client=`` always: a cached Script must never run on a client other than this one.
    written = _script(client)(keys=[], args=args, client=client)
    return int(written)


def _script(client: redis.Redis) -> Any:
    # register_script only hashes the text; EVALSHA falls back to EVAL after a Redis restart.
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(load_lua("worker.store", "write_results"))
    return script


_scripts: dict[int, Any] = {}
