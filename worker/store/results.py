"""Per-event job results, written straight into Celery's Redis result backend.

A ``train_many`` chunk or a micro-batch trains many events in one task, yet every event has its
own ``AsyncResult``. Each result is stored exactly as Celery's Redis backend stores a task's
(``SET celery-task-meta-<id> ... EX`` and a ``PUBLISH`` on the same name, which wakes any
``AsyncResult.get()`` waiting on it). One script call writes a whole batch: a round trip and a
command to encode instead of two commands per event, which cost more than training the event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import redis

from producer.protocol import result_key

__all__ = ["Outcome", "failure_payload", "write_results", "WRITE_RESULTS"]

#: ARGV: ttl, then (key, value, keep) triples. ``keep`` = 1 leaves an existing result alone: a
#: redelivered event comes back as ``duplicate`` and must not hide its first, ``trained`` result.
WRITE_RESULTS = """
local ttl = ARGV[1]
for i = 2, #ARGV, 3 do
  local written
  if ARGV[i + 2] == '1' then
    written = redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', ttl, 'NX')
  else
    written = redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', ttl)
  end
  if written then redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
end
return (#ARGV - 1) / 3
"""

Status = Literal["SUCCESS", "FAILURE"]


class Outcome:
    """The end of one job: its result object, or the error that failed it."""

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
        #: Written only if the task has no result yet (see ``WRITE_RESULTS``).
        self.keep_existing = keep_existing
        #: The event this result answers, when known.
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
                }
            )
        )
        args.append(1 if o.keep_existing else 0)
    _script(client)(keys=[], args=args)


def _script(client: redis.Redis) -> Any:
    # register_script only hashes the text; EVALSHA falls back to EVAL after a Redis restart.
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(WRITE_RESULTS)
    return script


_scripts: dict[int, Any] = {}
