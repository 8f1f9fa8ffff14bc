"""The four input features of an event, in pure Python: the worker's trainer and a service's
in-process ``ModelReader`` compute them with this one module, so they always agree.

input[0] = action_type_hash     in [-1, 1]
input[1] = timestamp_normalized time of day in [0, 1), UTC
input[2] = user_hash            in [-1, 1]
input[3] = context_indicator    1.0 when the context has entries, else 0.0
"""

from __future__ import annotations

from datetime import datetime
from hashlib import blake2b

from producer.events import InteractionData

__all__ = ["N_FEATURES", "Featurizer", "time_of_day", "unit_hash"]

N_FEATURES = 4
_U64_MAX = float(2**64 - 1)
_SECONDS_PER_DAY = 86400.0


def unit_hash(text: str, person: bytes, key: bytes = b"") -> float:
    """A hash of ``text`` mapped to [-1, 1], the same in every process, host and Python version
    (blake2b, not the built-in ``hash()``, which is salted per process). ``key``: blake2b's key;
    an empty one is the unkeyed hash."""
    digest = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=person, key=key).digest()
    return int.from_bytes(digest, "big") / _U64_MAX * 2.0 - 1.0


def time_of_day(ts: datetime) -> float:
    """Seconds since midnight UTC over 86400, in [0, 1). ``ts`` must be timezone-aware UTC."""
    seconds = ts.hour * 3600 + ts.minute * 60 + ts.second + ts.microsecond / 1e6
    return seconds / _SECONDS_PER_DAY


class Featurizer:
    """Features of events under one hash key, with the hashes of repeated users and actions
    memoised (bounded: a full cache starts over). The raw user id goes no further than its hash
    and this process's memory: it is never stored."""

    __slots__ = ("_actions", "_key", "_limit", "_users")

    def __init__(self, key: bytes = b"", cache_size: int = 65_536) -> None:
        self._key = key
        self._limit = cache_size
        self._users: dict[str, float] = {}
        self._actions: dict[str, float] = {}

    def action(self, action_type: str) -> float:
        value = self._actions.get(action_type)
        if value is None:
            if len(self._actions) >= self._limit:
                self._actions.clear()
            value = self._actions[action_type] = unit_hash(action_type, b"itrain-action", self._key)
        return value

    def user(self, user_id: str) -> float:
        value = self._users.get(user_id)
        if value is None:
            if len(self._users) >= self._limit:
                self._users.clear()
            value = self._users[user_id] = unit_hash(user_id, b"itrain-user", self._key)
        return value

    def row(self, event: InteractionData) -> tuple[float, float, float, float]:
        """The four features of one event, in order."""
        return (
            self.action(event.action_type),
            time_of_day(event.timestamp),
            self.user(event.user_id),
            1.0 if event.context else 0.0,
        )
