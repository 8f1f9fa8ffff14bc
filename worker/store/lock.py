"""The per-model update lock: a Redis lock with a TTL, a bounded wait and fast polling.

redis-py's ``Lock`` does the locking (SET NX PX to take it, a compare-and-delete script to give it
back). Two choices matter here: it polls every ``ITRAIN_LOCK_POLL`` seconds (1 ms) instead of its
default 100 ms, which alone costs 10x under contention; and the lock is not what keeps the
weights safe. It can expire under a paused holder, so every commit is also fenced by the
checkpoint version (see ``worker/store/lua/commit.lua``).
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType

import redis
from redis.exceptions import LockError, LockNotOwnedError

from producer.errors import LockTimeoutError
from producer.keys import ModelKeys
from producer.settings import Settings

__all__ = ["ModelLock"]


class ModelLock:
    """``with ModelLock(...) as lock:`` holds the model's lock; ``lock.waited`` is the wait in seconds."""

    def __init__(self, client: redis.Redis, model: str, settings: Settings) -> None:
        self.name = ModelKeys(model).lock
        self._settings = settings
        self._lock = client.lock(
            self.name,
            timeout=settings.lock_timeout,
            sleep=settings.lock_poll,
            blocking=True,
            blocking_timeout=settings.lock_wait,
            thread_local=False,
        )
        self.waited = 0.0
        self.acquired_at = 0.0

    def acquire(self) -> None:
        """Take the lock, retrying with backoff; ``LockTimeoutError`` when every try times out."""
        start = time.perf_counter()
        attempts = 1 + self._settings.lock_retries
        for attempt in range(attempts):
            if self._lock.acquire():
                self.acquired_at = time.perf_counter()
                self.waited = self.acquired_at - start
                return
            if attempt + 1 < attempts:
                time.sleep(min(0.05 * 2**attempt, 1.0))
        raise LockTimeoutError(
            f"lock_timeout: {self.name} not acquired within {self._settings.lock_wait:g} s, "
            f"{attempts} attempt(s)"
        )

    def release(self) -> float:
        """Give the lock back; returns how long it was held. An expired lock is not an error:
        the fenced commit already refused any write made after it expired."""
        held = time.perf_counter() - self.acquired_at
        with contextlib.suppress(LockNotOwnedError, LockError):
            self._lock.release()
        return held

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
