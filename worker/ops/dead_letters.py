"""``itrain dead-letters``: a model's dead letters, newest first, as an operator reads them.

A dead letter (``worker.outcome.dead_letter_entry``, kept in ``itrain:{m}:dead``, at most
``ITRAIN_DEAD_LETTER_MAX``) names what failed and why, never the user id or the payload. What is
shown is still a fixed choice of its fields: an entry written by another release, or by hand, shows
nothing beyond them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis

from producer.errors import ModelNotInitialisedError
from producer.keys import ModelKeys

__all__ = ["DeadLetter", "parse_dead_letter", "read_dead_letters"]


@dataclass(frozen=True)
class DeadLetter:
    """One failed message or event, as listed (``None``: the entry does not say)."""

    #: When it failed (ISO 8601, UTC).
    time: str | None
    event_id: str | None
    task_id: str | None
    action_type: str | None
    #: The error's class, e.g. ``TargetError``, ``DeliveryLimitError``.
    error: str | None
    message: str | None
    #: How many times its message was delivered (entries before this field was kept: None).
    deliveries: int | None
    #: Events of a batch message that failed whole.
    events: int | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _text(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    return value if isinstance(value, str) else None


def _count(entry: dict[str, Any], key: str) -> int | None:
    value = entry.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_dead_letter(raw: bytes) -> DeadLetter:
    """A stored entry as listed; an entry that is not a JSON object is listed as unreadable."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        entry = None
    if not isinstance(entry, dict):
        return DeadLetter(None, None, None, None, None, "unreadable dead-letter entry", None, None)
    return DeadLetter(
        time=_text(entry, "at"),
        event_id=_text(entry, "event_id"),
        task_id=_text(entry, "task_id"),
        action_type=_text(entry, "action_type"),
        error=_text(entry, "error"),
        message=_text(entry, "reason"),
        deliveries=_count(entry, "deliveries"),
        events=_count(entry, "events"),
    )


def read_dead_letters(client: redis.Redis, model: str, limit: int) -> tuple[list[DeadLetter], int]:
    """The model's newest ``limit`` dead letters, newest first, and how many it keeps in all (one
    round trip); ``ModelNotInitialisedError`` for a model that does not exist."""
    keys = ModelKeys(model)
    pipe = client.pipeline(transaction=False)
    pipe.exists(keys.ckpt)
    pipe.lrange(keys.dead, 0, limit - 1)
    pipe.llen(keys.dead)
    exists, entries, total = pipe.execute()
    if not exists:
        raise ModelNotInitialisedError(
            f"model {model!r} does not exist; `itrain models` lists the models (dead letters of "
            "events naming no model are kept apart, in itrain:{_unrouted}:dead)"
        )
    return [parse_dead_letter(raw) for raw in entries], int(total)
