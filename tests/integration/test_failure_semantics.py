"""The contract's failure semantics that a caller relies on: a lock that cannot be had, a full
queue, an unreachable Redis."""

from __future__ import annotations

import time

import pytest
import redis

from producer.client import TrainingClient
from producer.errors import BrokerFullError, LockTimeoutError, PublishError, QueueFullError
from producer.keys import ModelKeys
from producer.settings import Settings
from tests.helpers import make_event
from worker.devtools.embedded_redis import RedisServer


def test_lock_that_cannot_be_had_ends_as_lock_timeout(
    start_workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a worker with a short bounded wait, and the model's lock held by someone else
    model = make_model()
    start_workers(1, env={"ITRAIN_LOCK_WAIT": "0.2", "ITRAIN_LOCK_RETRIES": "1"})
    keys = ModelKeys(model)
    redis_client.set(keys.lock, "someone-else", px=60_000)
    params = redis_client.hget(keys.ckpt, "params")
    # When an event is sent
    handle = client.train_step(make_event(model))
    # Then it ends as FAILURE with reason lock_timeout, after its retries
    with pytest.raises(LockTimeoutError, match="lock_timeout"):
        handle.get(timeout=30)
    # And it is dead-lettered, the weights untouched
    assert redis_client.llen(keys.dead) == 1
    assert b"lock_timeout" in redis_client.lindex(keys.dead, 0)
    assert redis_client.hget(keys.ckpt, "params") == params
    # And once the lock is free the same event trains
    redis_client.delete(keys.lock)
    assert client.train_step(make_event(model)).get(timeout=30)["status"] == "trained"


def test_full_queue_refuses_and_enqueues_nothing(redis_url: str, redis_client: redis.Redis) -> None:
    # Given a queue of our own that already holds 3 messages, and a limit of 3
    queue = "itrain-full-test"
    redis_client.delete(queue)
    settings = Settings(redis_url=redis_url, queue=queue, max_queue_length=3)
    with TrainingClient(settings=settings) as c:
        c.train_many([make_event("default", i) for i in range(3)] * 1)  # one message
        c.train_step(make_event("default"))
        c.train_step(make_event("default"))
        assert redis_client.llen(queue) == 3
        # When more is sent, one event or many
        with pytest.raises(QueueFullError, match="ITRAIN_MAX_QUEUE_LENGTH"):
            c.train_step(make_event("default"))
        with pytest.raises(QueueFullError):
            c.train_many([make_event("default", i) for i in range(10)])
    # Then nothing more was enqueued
    assert redis_client.llen(queue) == 3
    redis_client.delete(queue)


@pytest.mark.parametrize("call", ["train_step", "train_many", "predict"])
def test_unreachable_redis_fails_within_publish_timeout(call: str) -> None:
    # Given a client pointed at a port where nothing listens
    settings = Settings(redis_url="redis://127.0.0.1:1/0", publish_timeout=1.0)
    arg = [make_event("default")] if call == "train_many" else make_event("default")
    with TrainingClient(settings=settings) as c:
        start = time.monotonic()
        # When it publishes, then a PublishError naming the URL comes, within a bound: not a
        # speed figure, a "never hangs" check (it used to hang for minutes in Celery's retries)
        with pytest.raises(PublishError, match=r"127\.0\.0\.1:1"):
            getattr(c, call)(arg)
        assert time.monotonic() - start < 15.0


def test_train_many_keeps_messages_under_the_size_limit(
    start_workers, make_model, client: TrainingClient
) -> None:
    # Given events of about 20 KB each (64 context entries of 256 characters)
    model = make_model()
    start_workers(1)
    big = {f"key{k:02d}": "v" * 256 for k in range(64)}
    events = [{**make_event(model, i), "context": big} for i in range(300)]
    # When they go through train_many (300 x 20 KB would be 6 MB in 2 chunks of 256)
    results = client.wait_all(client.train_many(events), timeout=60)
    # Then every one trains: no message was over ITRAIN_MAX_MESSAGE_BYTES
    assert sorted(r["step"] for r in results) == list(range(1, 301))


def test_a_full_redis_refuses_publishing_with_a_clear_error() -> None:
    """Under ``noeviction`` a Redis at ``maxmemory`` answers OOM: the caller gets
    ``BrokerFullError`` (a ``QueueFullError``) at once, and nothing is enqueued."""
    # Given a Redis whose memory is full
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        admin.set("ballast", b"x" * 2_000_000)
        admin.config_set("maxmemory", 1_000_000)  # below what is used: every write is refused
        with TrainingClient(settings=Settings(redis_url=server.url)) as client:
            # When events are published
            started = time.monotonic()
            with pytest.raises(BrokerFullError, match="out of memory"):
                client.train_step(make_event("default", 0, "full"))
            with pytest.raises(QueueFullError, match="nothing was enqueued"):
                client.train_many([make_event("default", i, "full") for i in range(10)])
            # Then the refusal is immediate and the queue holds nothing
            assert time.monotonic() - started < client.settings.publish_timeout
            assert admin.llen(client.settings.queue) == 0
            # And once memory is freed, publishing works again
            admin.config_set("maxmemory", 0)
            client.train_step(make_event("default", 1, "full"))
            assert admin.llen(client.settings.queue) == 1
        admin.close()
