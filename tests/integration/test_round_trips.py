"""What a critical section costs in round trips, counted by the dev tools' forwarder between a
real ``Trainer`` and a real redis-server: the lock's try rides in front of the checkpoint read,
and its release behind the fenced commit, so a batch costs two round trips under the lock (and
one after it for the lock's timings, which a worker sends with the results it writes anyway).
On a worker 1 ms from Redis, that is the lock's hold."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import redis

from producer.keys import ModelKeys
from producer.protocol import result_key
from producer.settings import Settings
from tests.conftest import ModelFactory
from tests.helpers import make_jobs
from worker.devtools.forwarder import Forwarder
from worker.store.lock import ModelLock
from worker.store.model_store import Store
from worker.store.results import Outcome, guarded_written, queue_guarded_results, write_results
from worker.training.trainer import Trainer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def forwarded(redis_url: str, redis_client: redis.Redis) -> Iterator[tuple[Forwarder, redis.Redis]]:
    port = redis_client.connection_pool.connection_kwargs["port"]
    # A delay, so that the forwarder tells a pipeline's later pieces from a new request
    with Forwarder(port, delay_ms=1) as fwd:
        client = redis.Redis(port=fwd.port, socket_timeout=10)
        yield fwd, client
        client.close()


def _trips(fwd: Forwarder) -> int:
    return fwd.stats()["round_trips"]


def _timing_trainer(client: redis.Redis, redis_url: str, make_model: ModelFactory) -> tuple[str, Trainer]:
    """A model, and a worker's trainer that records lock timings and keeps them for a round trip
    it makes anyway."""
    settings = Settings(redis_url=redis_url, record_timings=True)
    return make_model(), Trainer(Store(client, settings), settings, defer_timings=True)


def test_a_batch_costs_two_round_trips_under_the_lock(
    forwarded: tuple[Forwarder, redis.Redis], settings: Settings, make_model: ModelFactory
) -> None:
    fwd, client = forwarded
    model = make_model()
    trainer = Trainer(Store(client, settings), settings)
    # Given a worker that has trained a batch of this model (its checkpoint cached)
    first = trainer.train(make_jobs(model, "a", 50))
    assert {o.result["status"] for o in first} == {"trained"}
    # When it trains the next batch
    before = _trips(fwd)
    second = trainer.train(make_jobs(model, "b", 50))
    trips = _trips(fwd) - before
    # Then every event trained, in three round trips: lock + read, commit + release, the timings
    assert [o.result["step"] for o in second] == list(range(51, 101))
    assert trips == 3
    assert not client.exists(ModelKeys(model).lock)


def test_the_lock_timings_ride_with_the_results(
    forwarded: tuple[Forwarder, redis.Redis], redis_url: str, make_model: ModelFactory
) -> None:
    fwd, client = forwarded
    # Given a worker's trainer, which keeps its lock timings for the results' round trip
    model, trainer = _timing_trainer(client, redis_url, make_model)
    write_results(client, trainer.train(make_jobs(model, "g", 10)), 60, before=trainer.queue_timings)
    # When it trains a batch and writes its results with the timings in front
    before = _trips(fwd)
    outcomes = trainer.train(make_jobs(model, "h", 10))
    trained = _trips(fwd) - before
    written = write_results(client, outcomes, 60, before=trainer.queue_timings)
    # Then the batch cost two round trips, the results one, and the timings are there
    assert (trained, _trips(fwd) - before - trained) == (2, 1)
    assert written == 10
    assert client.llen(ModelKeys(model).prefix + "timings") == 2
    assert client.get(result_key("task-h-9")) is not None


def test_the_results_ride_in_the_commits_round_trip(
    forwarded: tuple[Forwarder, redis.Redis], redis_url: str, make_model: ModelFactory
) -> None:
    fwd, client = forwarded
    # Given a worker's trainer whose results may go with its commits (same Redis, no replicas)
    model, trainer = _timing_trainer(client, redis_url, make_model)
    trainer.train(make_jobs(model, "r", 10), results=60)
    # When it trains the next batch
    before = _trips(fwd)
    outcomes = trainer.train(make_jobs(model, "s", 10), results=60)
    # Then the batch cost two round trips in all, its results are written, each says so, and
    # the timings of the batch before rode with them
    assert _trips(fwd) - before == 2
    assert all(o.stored for o in outcomes)
    stored = [orjson.loads(client.get(result_key(f"task-s-{i}")) or b"{}") for i in range(10)]
    assert [r["result"]["step"] for r in stored] == list(range(11, 21))
    assert {r["result"]["version"] for r in stored} == {outcomes[0].result["version"]}
    assert client.llen(ModelKeys(model).prefix + "timings") == 1
    # And this batch's own timings go with the next round trip that carries timings
    trainer.flush_timings()
    assert client.llen(ModelKeys(model).prefix + "timings") == 2


def test_results_guarded_by_a_commit_id_are_written_only_while_the_checkpoint_holds_it(
    redis_client: redis.Redis, settings: Settings, make_model: ModelFactory
) -> None:
    model = make_model()
    trainer = Trainer(Store(redis_client, settings), settings)
    (done,) = trainer.train(make_jobs(model, "u", 1))
    ckpt = ModelKeys(model).ckpt
    cid = (redis_client.hget(ckpt, "cid") or b"").decode()
    answers = [Outcome.success(f"task-guarded-{n}", {"status": "trained", "event_id": n}) for n in "ab"]
    # Given the results of a batch guarded by another commit's id (a commit that did not land)
    pipe = redis_client.pipeline(transaction=False)
    queue_guarded_results(pipe, answers[:1], 60, ckpt, "0" * 32)
    # And another guarded by the id of the commit the checkpoint holds
    queue_guarded_results(pipe, answers[1:], 60, ckpt, cid)
    refused, landed = pipe.execute(raise_on_error=False)
    # Then only the second was written
    assert (guarded_written(refused), guarded_written(landed)) == (None, 1)
    assert redis_client.get(result_key("task-guarded-a")) is None
    assert orjson.loads(redis_client.get(result_key("task-guarded-b")) or b"{}")["status"] == "SUCCESS"
    assert done.result["status"] == "trained"


def test_a_batch_waits_for_a_held_lock_then_trains(
    forwarded: tuple[Forwarder, redis.Redis], settings: Settings, make_model: ModelFactory
) -> None:
    _, client = forwarded
    model = make_model()
    trainer = Trainer(Store(client, settings), settings)
    # Given another holder of the model's lock, which gives it back after 0.3 s
    other = ModelLock(client, model, settings)
    other.acquire()
    releaser = threading.Timer(0.3, other.release)
    releaser.start()
    # When a batch arrives meanwhile
    start = time.perf_counter()
    outcomes = trainer.train(make_jobs(model, "c", 20))
    releaser.join()
    # Then it waited for the lock, trained every event on the weights then current, and gave the lock back
    assert time.perf_counter() - start >= 0.3
    assert [o.result["step"] for o in outcomes] == list(range(1, 21))
    assert not client.exists(ModelKeys(model).lock)
    timings = client.lrange(ModelKeys(model).prefix + "timings", 0, -1)
    assert timings == [] or float(timings[0].split()[0]) >= 0.25


def test_a_snapshot_due_is_taken_under_the_lock_before_it_is_given_back(
    redis_url: str, redis_client: redis.Redis, make_model: ModelFactory
) -> None:
    settings = Settings(redis_url=redis_url, snapshot_every=10)
    model = make_model()
    trainer = Trainer(Store(redis_client, settings), settings)
    # When a batch crosses a multiple of ITRAIN_SNAPSHOT_EVERY
    outcomes = trainer.train(make_jobs(model, "d", 15))
    # Then it trained, a snapshot was kept, and the lock is free
    assert [o.result["step"] for o in outcomes] == list(range(1, 16))
    assert redis_client.keys(ModelKeys(model).snapshot_prefix + "*")
    assert not redis_client.exists(ModelKeys(model).lock)


def test_the_critical_section_survives_a_redis_that_forgot_its_scripts(
    redis_client: redis.Redis, settings: Settings, make_model: ModelFactory
) -> None:
    model = make_model()
    trainer = Trainer(Store(redis_client, settings), settings)
    trainer.train(make_jobs(model, "e", 5))
    # Given a Redis whose script cache was emptied (as after a restart or a failover)
    redis_client.script_flush()
    # When the next batch trains
    outcomes = trainer.train(make_jobs(model, "f", 5))
    # Then it trains whole and gives the lock back
    assert [o.result["step"] for o in outcomes] == list(range(6, 11))
    assert not redis_client.exists(ModelKeys(model).lock)
