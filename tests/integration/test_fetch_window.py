"""The fetch window (``worker.consume.fetch_window``): a worker woken while ``train_step`` events
come fast waits ``ITRAIN_BATCH_WAIT_MS`` and takes what came in one fetch; at a low rate it takes
each event at once. Real redis-server, real ``celery -A worker worker`` processes.

How fetches are counted: every message one fetch takes is recorded in kombu's unacked index under
the same score (the time sent with the fetch). The model's lock is held by the test, so every
event stays taken and unacknowledged until the test has counted, and then trains."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import orjson
import pytest
import redis

from producer.keys import ModelKeys
from tests.conftest import ModelFactory, WorkerFactory
from tests.helpers import ClientFactory, Workers, make_events, model_state, statuses, wait_results, wait_until
from worker.devtools.pacing import send_paced

FAST, SLOW = 1000.0, 20.0  # events a second


def _fetches(client: redis.Redis, queue: str) -> tuple[int, int]:
    """(messages taken from ``queue`` and not acknowledged, the fetches that took them)."""
    tags = [tag for tag, record in client.hgetall("unacked").items() if orjson.loads(record)[2] == queue]
    scores = {client.zscore("unacked_index", tag) for tag in tags}
    return len(tags), len(scores)


@dataclass
class Stream:
    """Sends events at a rate to workers whose model's lock the test holds (``__call__``)."""

    redis_url: str
    redis_client: redis.Redis
    start_workers: WorkerFactory
    workers: Workers
    make_model: ModelFactory
    make_client: ClientFactory

    def __call__(self, *, rate: float, events: int, adaptive: bool, count: int = 1) -> int:
        """Send ``events`` at ``rate`` to ``count`` workers whose model's lock is held; the fetches
        they took them in. Then every event trains, once."""
        queue, model = f"itrain.w{uuid.uuid4().hex[:6]}", self.make_model()
        env = {
            "ITRAIN_QUEUE": queue,
            "ITRAIN_BATCH_WAIT_MS": "10",
            "ITRAIN_BATCH_WAIT_ADAPTIVE": "1" if adaptive else "0",
            "ITRAIN_PREFETCH_MULTIPLIER": str(events * 2),
            "ITRAIN_LOCK_WAIT": "60",
            "ITRAIN_LOCK_POLL": "0.02",
        }
        self.start_workers(count, concurrency=1, env=env)
        client = self.make_client(self.redis_url, queue=queue)
        self.redis_client.set(ModelKeys(model).lock, b"held-by-the-test", px=120_000)
        handles, _ = send_paced(
            make_events(model, events, "w"), lambda part: [client.train_step(part[0])], rate=rate, size=1
        )
        wait_until(lambda: _fetches(self.redis_client, queue)[0] == events, 30, "every event taken")
        _, fetches = _fetches(self.redis_client, queue)
        self.redis_client.delete(ModelKeys(model).lock)
        assert statuses(wait_results(client, handles, 60, self.workers)) == {"trained": events}
        assert int(model_state(self.redis_client, model)["step"]) == events
        print(f"\n{events} events at {rate:g}/s, {count} worker(s), adaptive={adaptive}: {fetches} fetches")
        return fetches


@pytest.fixture
def stream(
    redis_url: str,
    redis_client: redis.Redis,
    start_workers: WorkerFactory,
    workers: Workers,
    make_model: ModelFactory,
    make_client: ClientFactory,
) -> Stream:
    return Stream(redis_url, redis_client, start_workers, workers, make_model, make_client)


def test_events_that_come_fast_are_gathered_into_few_fetches(stream: Stream) -> None:
    # Given 300 events at 1,000/s: after the first ~50 (the rate is learnt from what was taken),
    # a 10 ms window gathers ~10 at a time
    gathered = stream(rate=FAST, events=300, adaptive=True)
    # Then they were taken in at most half as many fetches as events
    assert gathered <= 150
    # And the former rule (each message taken as it comes, then held) fetched more often
    every = stream(rate=FAST, events=300, adaptive=False)
    assert every > gathered


def test_two_workers_gather_and_every_event_trains_once(stream: Stream) -> None:
    # Given two workers on one queue, each woken by the first message of a window and each
    # gathering (each learns the rate from its own part of the stream: ~100 events before both
    # gather)
    fetches = stream(rate=FAST, events=600, adaptive=True, count=2)
    # Then the events were still gathered into few fetches, and each trained once (in ``Stream``)
    assert fetches <= 300


def test_events_that_come_slowly_are_each_taken_at_once(stream: Stream) -> None:
    # Given 30 events at 20/s: a 10 ms window would gather 0.2 of them
    fetches = stream(rate=SLOW, events=30, adaptive=True)
    # Then each was fetched as it came, not waited for (a loaded machine may merge a few)
    assert fetches >= 24
