"""``ITRAIN_MIN_REPLICAS`` on the worker side: with the model store on a Redis of its own (not the
broker's) that has a replica, a real worker acknowledges its messages only once the replica
holds the commit (the broker has a replica too: the worker waits for those of every Redis it
writes to). With the replica stopped the commit lands on the master but the messages go
back to the queue, unanswered; once it is back they train exactly once (the redelivery finds
the markers), nothing is dead-lettered, and the model's step is the number of events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from producer.client import TrainingClient
from producer.settings import Settings
from tests.helpers import (
    Workers,
    check_each_event_once,
    create_model,
    make_events,
    model_state,
    statuses,
    wait_results,
    wait_until,
)
from worker.devtools.embedded_redis import ReplicaSet


@pytest.fixture
def store_set() -> Iterator[ReplicaSet]:
    with ReplicaSet(1) as rs:
        yield rs


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A broker with a replica of its own (its results, and in the second test its store)."""
    with ReplicaSet(1) as rs:
        yield rs.url


def test_worker_acks_only_once_the_store_replica_holds_the_commit(
    broker_url: str, store_set: ReplicaSet, workers: Workers
) -> None:
    # Given a broker and a store, each with one replica, and a worker that wants one replica to
    # hold each commit
    queue = f"q-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=broker_url, store_url=store_set.url, queue=queue)
    store = redis.Redis.from_url(store_set.url)
    broker = redis.Redis.from_url(broker_url)
    model = create_model(store, settings)
    env = {
        "ITRAIN_STORE_URL": store_set.url,
        "ITRAIN_QUEUE": queue,
        "ITRAIN_MIN_REPLICAS": "1",
        "ITRAIN_REPLICA_TIMEOUT_MS": "300",
    }
    workers.start(1, redis_url=broker_url, env=env)
    with TrainingClient(settings=settings) as client:  # (the client itself waits for none)
        # When the replica is there, events train as usual
        first = client.train_many(make_events(model, 20, "ok"))
        assert statuses(wait_results(client, first, 90, workers)) == {"trained": 20}

        # When the replica stops acknowledging and more events come
        store_set.pause(0)
        try:
            handles = client.train_many(make_events(model, 30, "rp"))
            chunk = handles[0].id.partition(":")[0].encode()
            # Then the commit lands on the store's master...
            wait_until(lambda: model_state(store, model)["step"] == 50, 90, "the commit on the master")
            # ...and the worker puts the message back instead of acknowledging it
            wait_until(
                lambda: "ReplicationError" in "".join(p.read_text() for p in workers.logs.values()),
                90,
                "a requeue for want of a replica",
            )
            assert broker.get(handles[0].key) is None  # no result: nothing answered yet
            held = [*broker.hvals("unacked"), *broker.lrange(queue, 0, -1)]
            assert any(chunk in m for m in held), "the message was acknowledged"
        finally:
            store_set.resume(0)

        # Then once the replica is back every event is answered, trained exactly once
        results = wait_results(client, handles, 120, workers)
        assert sum(statuses(results).values()) == 30
        assert set(statuses(results)) <= {"trained", "duplicate"}
        assert (
            check_each_event_once(
                store, model, [f"ok-{i}" for i in range(20)] + [f"rp-{i}" for i in range(30)]
            )["step"]
            == 50
        )
        assert client.stats(model)["dead_letters"] == 0
        wait_until(lambda: not any(chunk in m for m in broker.hvals("unacked")), 60, "the ack")
    store.close()
    broker.close()


def test_worker_acks_only_once_the_backend_replica_holds_the_results(
    broker_url: str, store_set: ReplicaSet, workers: Workers
) -> None:
    # Given results on a Redis of their own with one replica (broker and store: another)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=broker_url, result_backend=store_set.url, queue=queue)
    broker = redis.Redis.from_url(broker_url)
    model = create_model(broker, settings)
    env = {
        "ITRAIN_RESULT_BACKEND": store_set.url,
        "ITRAIN_QUEUE": queue,
        "ITRAIN_MIN_REPLICAS": "1",
        "ITRAIN_REPLICA_TIMEOUT_MS": "300",
    }
    workers.start(1, redis_url=broker_url, env=env)
    with TrainingClient(settings=settings) as client:
        # When the replica stops acknowledging and events come
        store_set.pause(0)
        try:
            handles = client.train_many(make_events(model, 10, "rb"))
            chunk = handles[0].id.partition(":")[0].encode()
            # Then the worker trains them and writes the results, but does not acknowledge
            wait_until(
                lambda: "ReplicationError" in "".join(p.read_text() for p in workers.logs.values()),
                90,
                "a requeue for want of a replica",
            )
            held = [*broker.hvals("unacked"), *broker.lrange(queue, 0, -1)]
            assert any(chunk in m for m in held), "the message was acknowledged"
        finally:
            store_set.resume(0)
        # And once the replica is back the message is acknowledged; each event trained once
        assert statuses(wait_results(client, handles, 120, workers)) == {"trained": 10}
        wait_until(lambda: not any(chunk in m for m in broker.hvals("unacked")), 60, "the ack")
        assert model_state(broker, model)["step"] == 10
    broker.close()
