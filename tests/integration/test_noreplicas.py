"""A master that refuses writes under ``min-replicas-to-write`` answers ``NOREPLICAS``. Every client
takes that as "this server cannot take writes now": it drops the connection (so a sentinel-managed
or stable-address one reconnects to whatever master there is), retries within
``ITRAIN_PUBLISH_TIMEOUT``, then raises our ``PublishError`` naming the cause, never redis-py's
error; once the master has its replica again the same client sends. Real servers: a master whose
only replica is stopped (SIGSTOP) past ``min-replicas-max-lag``, and a Sentinel group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.async_client import AsyncTrainingClient
from producer.client import TrainingClient
from producer.errors import PublishError
from producer.model_reader import ModelReader
from producer.redis_conn import connect
from producer.settings import Settings
from tests.helpers import Workers, create_model, make_event, make_events, wait_until
from worker.devtools.embedded_redis import ReplicaSet
from worker.devtools.sentinel_set import SentinelSet

pytestmark = pytest.mark.timeout(300)

PUBLISH_TIMEOUT = 2.0
#: Generous: the machine is shared and busy. The bound says "it gave up", not how fast.
MARGIN = 30.0


@pytest.fixture
def isolated() -> Iterator[ReplicaSet]:
    """A master with ``min-replicas-to-write 1`` and one replica, in sync."""
    extra = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "1"]
    with ReplicaSet(1, extra=extra) as group:
        yield group


def good_replicas(url: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=5) as admin:
        return int(admin.info("replication").get("min_slaves_good_slaves", 0))


def cut_off(group: ReplicaSet) -> None:
    group.pause(0)
    wait_until(lambda: good_replicas(group.url) == 0, 60, "the master to count no good replica")


def rejoin(group: ReplicaSet) -> None:
    group.resume(0)
    wait_until(lambda: good_replicas(group.url) == 1, 60, "the master to count its replica again")


def queued(url: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=5) as admin:
        return int(admin.llen("itrain"))


def test_client_raises_publish_error_naming_noreplicas_then_sends_on_the_same_client(
    isolated: ReplicaSet,
) -> None:
    # Given a client that has sent once
    client = TrainingClient(settings=Settings(redis_url=isolated.url, publish_timeout=PUBLISH_TIMEOUT))
    try:
        client.train_step(make_event("m", 0, "nr"))
        # When the master's only replica stops acknowledging past min-replicas-max-lag
        cut_off(isolated)
        # Then train_step and train_many raise our PublishError naming NOREPLICAS, after retrying
        # within the publish timeout, and nothing is enqueued
        for send in (
            lambda: client.train_step(make_event("m", 1, "nr")),
            lambda: client.train_many(make_events("m", 3, "nr", start=2)),
        ):
            start = time.monotonic()
            with pytest.raises(PublishError, match="NOREPLICAS") as raised:
                send()
            took = time.monotonic() - start
            assert not isinstance(raised.value, redis.RedisError), type(raised.value).__mro__
            assert took < PUBLISH_TIMEOUT + MARGIN, took
        assert queued(isolated.url) == 1
        # And once the replica is back, the same client sends
        rejoin(isolated)
        client.train_step(make_event("m", 5, "nr"))
        client.train_many(make_events("m", 2, "nr", start=6))
        assert queued(isolated.url) == 3  # messages: a train_many chunk is one
    finally:
        client.close()


def test_async_client_raises_publish_error_naming_noreplicas_then_sends(isolated: ReplicaSet) -> None:
    async def scenario() -> None:
        settings = Settings(redis_url=isolated.url, publish_timeout=PUBLISH_TIMEOUT)
        async with AsyncTrainingClient(settings=settings) as client:
            await client.train_step(make_event("m", 0, "anr"))
            cut_off(isolated)
            with pytest.raises(PublishError, match="NOREPLICAS"):
                await client.train_step(make_event("m", 1, "anr"))
            with pytest.raises(PublishError, match="NOREPLICAS"):
                await client.train_many(make_events("m", 2, "anr", start=2))
            rejoin(isolated)
            await client.train_step(make_event("m", 4, "anr"))
            await client.train_many(make_events("m", 2, "anr", start=5))

    asyncio.run(scenario())
    assert queued(isolated.url) == 3


def test_store_client_drops_its_connection_on_noreplicas(isolated: ReplicaSet) -> None:
    # Given the worker's kind of client (producer.redis_conn.connect: the store, the results) and
    # a connection it holds
    client = connect(isolated.url, 5.0)
    try:
        client.set("k", "1")
        conn = client.connection_pool.get_connection()
        client.connection_pool.release(conn)
        cut_off(isolated)
        # When a write meets NOREPLICAS
        with pytest.raises(redis.ConnectionError, match="NOREPLICAS"):
            client.set("k", "2")
        # Then it was a lost connection to the worker (a Redis fault: the messages go back), and
        # the connection was dropped, to be made again on next use
        assert conn._sock is None
        rejoin(isolated)
        client.set("k", "3")
    finally:
        client.close()


def test_sentinel_client_reconnects_on_noreplicas(tmp_path: Path) -> None:
    # Given a client on a sentinel URL, whose master is then told to need more replicas than it has
    with SentinelSet(data_dir=tmp_path / "sentinels", replicas=1) as group:
        master = group.server_client(group.master_port())
        client = TrainingClient(
            settings=Settings(
                redis_url=group.url(), sentinel_master=group.name, publish_timeout=PUBLISH_TIMEOUT
            )
        )
        try:
            client.train_step(make_event("m", 0, "snr"))
            master.config_set("min-replicas-to-write", 2)
            # When it sends, then it raises our PublishError naming NOREPLICAS
            with pytest.raises(PublishError, match="NOREPLICAS"):
                client.train_step(make_event("m", 1, "snr"))
            with pytest.raises(PublishError, match="NOREPLICAS"):
                client.train_many(make_events("m", 2, "snr", start=2))
            # And once the master can take writes again, the same client sends
            master.config_set("min-replicas-to-write", 0)
            client.train_step(make_event("m", 4, "snr"))
            assert master.llen("itrain") == 2
        finally:
            client.close()
            master.close()


def test_worker_on_an_isolated_master_reconnects_and_trains_once_it_can_write(
    isolated: ReplicaSet, workers: Workers
) -> None:
    # Given a model and a worker on a master with min-replicas-to-write 1
    settings = Settings(redis_url=isolated.url)
    with connect(isolated.url, 5.0) as admin:
        model = create_model(admin, settings)
    (worker,) = workers.start(1, redis_url=isolated.url)
    # When the master's only replica stops: the worker's next fetch (a write) meets NOREPLICAS
    cut_off(isolated)
    # (as a lost connection, which kombu reconnects, not as a refusal retried on the same one:
    # "Redis refused to hand out messages (NOREPLICAS ...)")
    wait_until(
        lambda: "Connection to broker lost" in workers.log(worker),
        120,
        "the worker to meet NOREPLICAS as a lost connection",
    )
    assert "Redis refused to hand out messages (NOREPLICAS" not in workers.log(worker)
    # Then, once the replica is back, it trains on its own (reconnected; no restart)
    rejoin(isolated)
    with TrainingClient(settings=settings) as client:
        result = client.train_step(make_event(model, 0, "wnr")).get(timeout=120)
    assert result["status"] == "trained", result
    assert result["step"] == 1, result
    workers.assert_alive([worker])


def test_predict_on_a_master_short_of_replicas_raises_publish_error_then_predicts(
    isolated: ReplicaSet, workers: Workers
) -> None:
    # Given a model, a worker and both clients on a master with min-replicas-to-write 1
    settings = Settings(redis_url=isolated.url, publish_timeout=PUBLISH_TIMEOUT)
    with connect(isolated.url, 5.0) as admin:
        model = create_model(admin, settings)
    (worker,) = workers.start(1, redis_url=isolated.url)
    event = make_event(model, 0, "pnr")
    with TrainingClient(settings=settings) as client:
        before = client.predict(event).get(timeout=60)
        # When the master's only replica stops acknowledging
        cut_off(isolated)
        # Then predict (a request sent as a message: a write) raises our PublishError naming
        # NOREPLICAS and the way to predict without writing, and enqueues nothing
        start = time.monotonic()
        with pytest.raises(PublishError, match=r"NOREPLICAS.*ModelReader") as raised:
            client.predict(event)
        assert time.monotonic() - start < PUBLISH_TIMEOUT + MARGIN
        assert not isinstance(raised.value, redis.RedisError), type(raised.value).__mro__

        async def predict_async() -> None:
            async with AsyncTrainingClient(settings=settings) as aclient:
                with pytest.raises(PublishError, match=r"NOREPLICAS.*ModelReader"):
                    await aclient.predict(event)

        asyncio.run(predict_async())
        assert queued(isolated.url) == 0
        # And the read-only way the error names answers meanwhile, as the worker did
        with ModelReader(model, isolated.url, settings=settings) as reader:
            local = reader.predict(event)
        assert local["prediction"] == pytest.approx(before["prediction"], abs=1e-9)
        # And once the replica is back, the same client predicts what it predicted before
        rejoin(isolated)
        after = client.predict(event).get(timeout=120)
    assert after == before
    workers.assert_alive([worker])
