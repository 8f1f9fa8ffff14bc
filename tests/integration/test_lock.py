"""The per-model lock (``worker.store.lock.ModelLock``), in process, against a real redis-server."""

from __future__ import annotations

import time

import pytest
import redis

from producer.errors import LockTimeoutError
from producer.keys import ModelKeys
from producer.settings import Settings
from worker.store.lock import ModelLock


def test_one_holder_at_a_time_and_a_bounded_wait(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    settings = Settings(redis_url=redis_url, lock_timeout=5, lock_wait=0.2, lock_retries=1)
    holder = ModelLock(redis_client, model_name, settings)
    holder.acquire()
    assert redis_client.exists(ModelKeys(model_name).lock)
    # A second worker waits lock_wait per attempt, then gives up with lock_timeout
    with pytest.raises(LockTimeoutError, match="lock_timeout"):
        ModelLock(redis_client, model_name, settings).acquire()
    held = holder.release()
    assert held > 0
    assert not redis_client.exists(ModelKeys(model_name).lock)
    # Released: the next one takes it (a held lock would have raised LockTimeoutError as above)
    with ModelLock(redis_client, model_name, settings):
        assert redis_client.exists(ModelKeys(model_name).lock)


def test_a_lock_expires_under_a_paused_holder_and_its_release_is_harmless(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    settings = Settings(redis_url=redis_url, lock_timeout=0.2, lock_poll=0.001, lock_wait=2)
    paused = ModelLock(redis_client, model_name, settings)
    paused.acquire()
    time.sleep(0.3)  # the holder is paused past its TTL
    other = ModelLock(redis_client, model_name, settings)
    other.acquire()  # taken over; the fenced commit is what protects the weights
    paused.release()  # not an error, and it does not release the other's lock
    assert redis_client.exists(ModelKeys(model_name).lock)
    other.release()
