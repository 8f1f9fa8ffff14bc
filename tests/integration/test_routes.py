"""Many tenants: a model on a queue of its own (``itrain init --queue``, ``itrain route``), with a
real redis-server and real ``celery -A worker worker`` processes consuming both queues (Celery's
``-Q``).

Each test has queues of its own (``<q>`` and ``<q>.b``), so leftovers of other tests never mix in.
Events are sent before a worker starts, so where each one landed is read from the queue lists
themselves, then the worker trains them all.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from producer.async_client import AsyncTrainingClient
from producer.client import TrainingClient
from producer.errors import PermissionDeniedError, QueueFullError, ReplicationError
from producer.keys import ROUTES
from producer.settings import Settings, get_settings
from tests.helpers import Workers, make_event
from worker.cli import main
from worker.ops.acl import acl_lines, unknown_commands
from worker.ops.exporter import ItrainCollector

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def queue() -> str:
    """This test's default queue (``ITRAIN_QUEUE``); its routed queue is ``<queue>.b``."""
    return f"rt{uuid.uuid4().hex[:8]}"


@pytest.fixture
def itrain(
    redis_url: str, queue: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    """``itrain ARGS...`` in process with ``ITRAIN_QUEUE`` = this test's queue: (exit code,
    stdout, stderr)."""
    monkeypatch.setenv("ITRAIN_QUEUE", queue)

    def run(*argv: str) -> tuple[int, str, str]:
        get_settings.cache_clear()
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    get_settings.cache_clear()


def queued_models(client: redis.Redis, queue: str) -> list[str]:
    """The model of every event waiting in ``queue``, oldest first (whatever the task)."""
    models: list[str] = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSH: the oldest is at the right
        envelope = orjson.loads(raw)
        args = orjson.loads(base64.b64decode(envelope["body"]))[0]
        task = envelope["headers"]["task"]
        # a batch's last argument is its events ([events] or linger's [ids, events])
        events = args[-1] if task == "itrain.train_batch" else [args[0]]
        models += [e.get("model", "default") for e in events]
    return models


def start_worker(workers: Workers, redis_url: str, queue: str) -> None:
    """One worker consuming ``<queue>`` and ``<queue>.b`` (Celery's ``-Q``)."""
    workers.start(1, redis_url=redis_url, env={"ITRAIN_QUEUE": queue}, queues=[queue, f"{queue}.b"])


def test_routed_events_land_on_their_queue_and_train(
    itrain: Cli,
    redis_url: str,
    redis_client: redis.Redis,
    queue: str,
    make_model: Callable[..., str],
    workers: Workers,
) -> None:
    routed = f"{queue}.b"
    # Given model a created on a queue of its own, and model b on the default queue
    a, b = f"m-{uuid.uuid4().hex[:10]}", make_model()
    code, out, err = itrain("init", "--model", a, "--queue", routed)
    assert code == 0, err
    assert f"{queue} -> {routed}" in out
    assert f"no live worker consumes queue {routed!r}" in err  # no worker yet
    assert redis_client.hget(ROUTES, a) == routed.encode()
    # When events of both are sent by every path: train_many interleaved, train_step, linger,
    # the asyncio client, predict
    settings = Settings(redis_url=redis_url, queue=queue, chunk_size=4)
    models = [a if i % 3 else b for i in range(30)]
    events = [make_event(m, i, f"mix-{queue}") for i, m in enumerate(models)]
    with TrainingClient(settings=settings) as client:
        handles = client.train_many(events)
        steps = [client.train_step(make_event(m, i, f"st-{queue}")) for i, m in enumerate([a, b, a])]
        predicted = client.predict(make_event(a, 99, f"pr-{queue}"))
    with TrainingClient(settings=settings, linger_ms=5) as lingering:
        lingered = [lingering.train_step(make_event(m, i, f"lg-{queue}")) for i, m in enumerate([b, a, a, b])]

    async def from_asyncio() -> list[Any]:
        async with AsyncTrainingClient(settings=settings) as aclient:
            many = await aclient.train_many(
                [make_event(m, i, f"as-{queue}") for i, m in enumerate([a, b, a])]
            )
            one = await aclient.train_step(make_event(a, 7, f"as1-{queue}"))
            return [*many, one]

    async_handles = asyncio.run(from_asyncio())
    # Then every event of a waits on a's queue and every event of b on the default one
    on_routed, on_default = queued_models(redis_client, routed), queued_models(redis_client, queue)
    assert set(on_routed) == {a}
    assert set(on_default) == {b}
    sent_a = models.count(a) + 2 + 2 + 3  # train_many, train_step, linger, asyncio
    assert len(on_routed) == sent_a + 1  # and the prediction
    assert len(on_default) == models.count(b) + 1 + 2 + 1
    # When a worker consumes both queues
    start_worker(workers, redis_url, queue)
    with TrainingClient(settings=settings) as client:
        results = client.wait_all([*handles, *steps, *lingered, *async_handles], timeout=120)
        # Then every event trained on its model, and train_many's handles are in input order
        assert [r["status"] for r in results] == ["trained"] * len(results)
        assert [(r["event_id"], r["model"]) for r in results[: len(events)]] == [
            (e["event_id"], e["model"]) for e in events
        ]
        assert client.stats(a)["step"] == sent_a
        assert client.stats(b)["step"] == len(results) - sent_a
        assert predicted.get(timeout=60)["model"] == a
    # And `itrain models` shows each model's queue, with no warning now that a worker consumes them
    code, out, err = itrain("models")
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.count("|") > 3}
    assert routed in rows[a]
    assert f"| {queue} " in rows[b]
    assert queue not in err


def test_train_many_across_two_routes_is_all_or_none(
    itrain: Cli, redis_url: str, redis_client: redis.Redis, queue: str, make_model: Callable[..., str]
) -> None:
    routed = f"{queue}.b"
    a, b = make_model(), make_model()
    assert itrain("route", "--model", a, "--queue", routed)[0] == 0
    # Given a's queue at ITRAIN_MAX_QUEUE_LENGTH and b's queue empty
    settings = Settings(redis_url=redis_url, queue=queue, max_queue_length=3)
    with TrainingClient(settings=settings) as client:
        for i in range(3):
            client.train_step(make_event(a, i, "fill"))
        # When a train_many holds events of both
        with pytest.raises(QueueFullError, match=rf"queue '{routed}' holds 3 messages"):
            client.train_many([make_event(m, i, "both") for i, m in enumerate([b, a, b])])
        # Then nothing was pushed, to either queue
        assert (redis_client.llen(queue), redis_client.llen(routed)) == (0, 3)
        # And b alone still goes (the limit is each queue's own)
        client.train_many([make_event(b, 0, "b-alone")])
        assert redis_client.llen(queue) == 1

    # Given a producer user limited to the default queue (`itrain acl --role producer --queues`)
    user = f"itrain-rt-{uuid.uuid4().hex[:6]}"
    _, line = acl_lines("producer", user, queue, "pw", unknown_commands(redis_client), queues=[queue])
    redis_client.execute_command(*line.split())
    limited_url = redis_url.replace("redis://", f"redis://{user}:pw@")
    try:
        with TrainingClient(settings=Settings(redis_url=limited_url, queue=queue)) as client:
            # When a train_many holds events for its queue and for a's
            with pytest.raises(PermissionDeniedError):
                client.train_many([make_event(m, i, "acl") for i, m in enumerate([b, a])])
            # Then the transaction pushed none of them, not even the allowed queue's
            assert (redis_client.llen(queue), redis_client.llen(routed)) == (1, 3)
            client.train_many([make_event(b, 1, "acl-ok")])  # its own queue is fine
            assert redis_client.llen(queue) == 2
    finally:
        redis_client.acl_deluser(user)


def test_stale_cached_route_still_trains(
    itrain: Cli,
    redis_url: str,
    redis_client: redis.Redis,
    queue: str,
    make_model: Callable[..., str],
    workers: Workers,
) -> None:
    routed = f"{queue}.b"
    model = make_model()
    # Given a client whose copy of the routes is fresh (model on the default queue) and kept long
    stale = TrainingClient(settings=Settings(redis_url=redis_url, queue=queue, routes_ttl=3600))
    quick = TrainingClient(settings=Settings(redis_url=redis_url, queue=queue, routes_ttl=0.2))
    try:
        assert stale.queue_of(model) == queue
        assert quick.queue_of(model) == queue
        # When the model moves to a queue of its own
        code, out, _ = itrain("route", "--model", model, "--queue", routed)
        assert code == 0
        assert f"{queue} -> {routed}" in out
        assert "until it is empty" in out
        # Then the stale client still sends to the old queue, a fresh one to the new queue
        old = stale.train_step(make_event(model, 0, "stale"))
        fresh = TrainingClient(settings=Settings(redis_url=redis_url, queue=queue))
        new = fresh.train_step(make_event(model, 1, "fresh"))
        fresh.close()
        assert queued_models(redis_client, queue) == [model]
        assert queued_models(redis_client, routed) == [model]
        # And a client sees the move once its copy is ITRAIN_ROUTES_TTL old
        time.sleep(0.3)
        assert quick.queue_of(model) == routed
        # And both events train once a worker consumes both queues (the old one drains)
        start_worker(workers, redis_url, queue)
        results = stale.wait_all([old, new], timeout=120)
        assert [r["status"] for r in results] == ["trained", "trained"]
        assert stale.stats(model)["step"] == 2
        assert redis_client.llen(queue) == 0
    finally:
        stale.close()
        quick.close()


def test_invalid_queue_is_refused_before_anything_is_written(
    itrain: Cli, redis_client: redis.Redis, queue: str, make_model: Callable[..., str]
) -> None:
    name = f"m-{uuid.uuid4().hex[:10]}"
    for bad in ("other", f"{queue}:x", f"{queue}.a.b", f"{queue}."):
        code, _, err = itrain("init", "--model", name, "--queue", bad)
        assert code != 0
        assert len(err.strip().splitlines()) == 1
        assert f"queue {bad!r} is not one a model can be routed to" in err
    assert not redis_client.exists(f"itrain:{{{name}}}:ckpt")
    assert redis_client.hget(ROUTES, name) is None
    # and `itrain route` refuses an unknown model and a bad queue alike
    code, _, err = itrain("route", "--model", name, "--queue", f"{queue}.b")
    assert code != 0
    assert "does not exist" in err
    model = make_model()
    code, _, err = itrain("route", "--model", model, "--queue", "elsewhere")
    assert code != 0
    assert "is not one a model can be routed to" in err
    assert redis_client.hget(ROUTES, model) is None


def test_exporter_and_delete_follow_the_routes(
    itrain: Cli, redis_client: redis.Redis, redis_url: str, queue: str, make_model: Callable[..., str]
) -> None:
    model = make_model()
    routed = f"{queue}.b"
    assert itrain("route", "--model", model, "--queue", routed)[0] == 0
    with TrainingClient(settings=Settings(redis_url=redis_url, queue=queue)) as client:
        client.train_many([make_event(model, i, "exp") for i in range(3)])
    # The exporter measures the routed queue beside its own
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ItrainCollector(redis_client, [queue]))
    text = generate_latest(registry).decode()
    assert f'itrain_queue_messages{{queue="{routed}"}} 1.0' in text
    assert f'itrain_queue_messages{{queue="{queue}"}} 0.0' in text
    # Moving back to the default queue removes the entry; deleting a model forgets its route
    assert itrain("route", "--model", model, "--queue", queue)[0] == 0
    assert redis_client.hget(ROUTES, model) is None
    assert itrain("route", "--model", model, "--queue", routed)[0] == 0
    assert itrain("delete", "--model", model, "--yes")[0] == 0
    assert redis_client.hget(ROUTES, model) is None


def test_routes_are_read_once_per_ttl_not_per_call(
    itrain: Cli, redis_client: redis.Redis, redis_url: str, queue: str, make_model: Callable[..., str]
) -> None:
    model = make_model()
    assert itrain("route", "--model", model, "--queue", f"{queue}.b")[0] == 0

    def reads() -> int:
        stats = redis_client.info("commandstats").get("cmdstat_hgetall", {"calls": 0})
        return int(stats["calls"])

    # Given a client whose copy of the routes lasts an hour
    before = reads()
    with TrainingClient(settings=Settings(redis_url=redis_url, queue=queue, routes_ttl=3600)) as client:
        # When it sends by every path, many times
        for i in range(50):
            client.train_step(make_event(model, i, "ttl"), result=False)
        for k in range(5):
            client.train_many([make_event(model, i, f"ttl-{k}") for i in range(10)], result=False)
        client.predict(make_event(model, 0, "ttl-p"))
        # Then it read the routes once, and every event went to the model's queue
        assert reads() - before == 1
    assert redis_client.llen(f"{queue}.b") == 50 + 5 + 1
    # and `itrain acl --queues` checks the names it is given, for the roles that push
    code, out, _ = itrain("acl", "--role", "producer", "--queues", f"{queue}.b", "--password", "pw")
    assert code == 0
    assert f" ~{queue}.b " in out
    assert f" ~{queue}.* " not in out
    code, _, err = itrain("acl", "--role", "producer", "--queues", "elsewhere")
    assert code != 0
    assert "is not one a model can be routed to" in err
    code, _, err = itrain("acl", "--role", "monitor", "--queues", f"{queue}.b")
    assert code != 0
    assert "--queues" in err


def test_two_queue_push_waits_for_replicas_after_the_transaction(
    itrain: Cli, redis_client: redis.Redis, redis_url: str, queue: str, make_model: Callable[..., str]
) -> None:
    a, b = make_model(), make_model()
    assert itrain("route", "--model", a, "--queue", f"{queue}.b")[0] == 0
    # Given clients that want a replica of a Redis that has none (each WAIT falls short)
    settings = Settings(redis_url=redis_url, queue=queue, min_replicas=1, replica_timeout_ms=10)
    events = [make_event(m, i, f"rep-{queue}") for i, m in enumerate([a, b, a, b])]
    # When a train_many spans both queues, from the sync client and the asyncio one
    with TrainingClient(settings=settings) as client, pytest.raises(ReplicationError) as sync_error:
        client.train_many(events[:2])

    async def from_asyncio() -> None:
        async with AsyncTrainingClient(settings=settings) as aclient:
            await aclient.train_many(events[2:])

    with pytest.raises(ReplicationError) as async_error:
        asyncio.run(from_asyncio())
    # Then the WAIT after the transaction reports every event, and every message is in Redis
    assert sync_error.value.event_ids == [e["event_id"] for e in events[:2]]
    assert async_error.value.event_ids == [e["event_id"] for e in events[2:]]
    assert (sync_error.value.wanted, sync_error.value.got) == (1, 0)
    assert queued_models(redis_client, f"{queue}.b") == [a, a]
    assert queued_models(redis_client, queue) == [b, b]
