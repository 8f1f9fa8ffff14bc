"""The per-model update lock: a Redis key with a TTL, a bounded wait and fast polling.

Taking it is ``SET lock token NX PX ttl``; giving it back is ``lua/release.lua`` (delete only if
the token is still ours). Three choices matter here:

- It polls every ``ITRAIN_LOCK_POLL`` seconds (1 ms) instead of redis-py's default 100 ms, which
  alone costs 10x under contention.
- Both halves can ride in a pipeline with the commands next to them (``queue_acquire`` before
  the checkpoint read, ``queue_release`` after the commit), so a critical section costs two round
  trips, not four: on a worker 1 ms from Redis that is what decides the lock's hold.
- The lock is not what keeps the weights safe. It can expire under a paused holder, so every
  commit is also fenced by the checkpoint version (see ``worker/store/lua/commit.lua``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import redis
from redis.client import Pipeline

from producer.errors import LockTimeoutError
from producer.keys import ModelKeys
from producer.settings import Settings
from worker.lua import load_lua

__all__ = ["ModelLock"]

T = TypeVar("T")


class ModelLock:
    """``with ModelLock(...) as lock:`` holds the model's lock; ``lock.waited`` is the wait in seconds.

    One holder at a time, one acquisition per object at a time (a new token each time)."""

    def __init__(self, client: redis.Redis, model: str, settings: Settings) -> None:
        self.name = ModelKeys(model).lock
        self._client = client
        self._settings = settings
        self._release_script = client.register_script(load_lua(__package__, "release"))
        self._ttl_ms = max(1, int(settings.lock_timeout * 1000))
        self._token: bytes | None = None  # ours while we hold it (or think we do)
        self._asked_at = 0.0
        self.waited = 0.0
        self.acquired_at = 0.0
        #: How long the last acquisition was held (set when it is given back).
        self.held = 0.0

    @property
    def owned(self) -> bool:
        """Taken and not yet given back (it may have expired since)."""
        return self._token is not None

    # -- taking it --------------------------------------------------------------------------------

    def queue_acquire(self, pipe: Pipeline, *, since: float | None = None) -> None:
        """One try at the lock, queued on ``pipe`` (its reply goes to ``took``). ``since``: when
        the wait began (``time.perf_counter()``), now by default."""
        self._token = os.urandom(16).hex().encode()
        self._asked_at = time.perf_counter() if since is None else since
        pipe.set(self.name, self._token, nx=True, px=self._ttl_ms)

    def took(self, reply: Any) -> bool:
        """Whether the queued try got the lock."""
        if isinstance(reply, Exception):
            self._token = None
            raise reply
        if not reply:
            self._token = None
            return False
        self.acquired_at = time.perf_counter()
        self.waited = self.acquired_at - self._asked_at
        return True

    def acquire(self, *, since: float | None = None) -> None:
        """Take the lock, polling every ``ITRAIN_LOCK_POLL`` seconds for up to ``ITRAIN_LOCK_WAIT``,
        retried with backoff; ``LockTimeoutError`` when every try times out. ``since``: when the
        wait began (a try made before, in a pipeline), for ``waited``."""

        def one_try() -> bool | None:
            pipe = self._client.pipeline(transaction=False)
            self.queue_acquire(pipe)
            return True if self.took(pipe.execute(raise_on_error=False)[0]) else None

        self.wait_for(one_try, since=since)

    def wait_for(self, attempt: Callable[[], T | None], *, since: float | None = None) -> T:
        """Poll ``attempt`` (one try at the lock, queued by ``queue_acquire`` with whatever else
        rides in its round trip: ``None`` when the lock was not free) every ``ITRAIN_LOCK_POLL``
        seconds for up to ``ITRAIN_LOCK_WAIT``, retried with backoff; its first result once the
        lock is ours, ``LockTimeoutError`` when every try times out. ``waited`` counts from
        ``since`` (now by default)."""
        start = time.perf_counter() if since is None else since
        s = self._settings
        attempts = 1 + s.lock_retries
        for attempt_no in range(attempts):
            deadline = time.monotonic() + s.lock_wait
            while True:
                found = attempt()
                if found is not None:
                    self.waited = self.acquired_at - start
                    return found
                if time.monotonic() > deadline:
                    break
                time.sleep(s.lock_poll)
            if attempt_no + 1 < attempts:
                time.sleep(min(0.05 * 2**attempt_no, 1.0))
        raise LockTimeoutError(
            f"lock_timeout: {self.name} not acquired within {s.lock_wait:g} s, {attempts} attempt(s)"
        )

    # -- giving it back ---------------------------------------------------------------------------

    def queue_release(self, pipe: Pipeline) -> None:
        """The compare-and-delete, queued on ``pipe`` (its reply goes to ``released``). EVALSHA
        itself: a script object on a pipeline would cost a ``SCRIPT EXISTS`` round trip first."""
        pipe.evalsha(self._release_script.sha, 1, self.name, self._token or b"")

    def released(self, reply: Any) -> float:
        """The queued release ran: how long the lock was held. An error reply (``NOSCRIPT``: a
        restarted Redis forgot the script) leaves the lock ours, for ``release`` to give back."""
        self.held = time.perf_counter() - self.acquired_at
        if not isinstance(reply, Exception):
            self._token = None
        return self.held

    def release(self) -> float:
        """Give the lock back (if a pipeline has not already); returns how long it was held. An
        expired lock is not an error: the fenced commit already refused any write made after it
        expired, and another holder's lock is left alone."""
        if self._token is None:
            return self.held
        token, self._token = self._token, None
        self.held = time.perf_counter() - self.acquired_at
        self._release_script(keys=[self.name], args=[token])
        return self.held

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
