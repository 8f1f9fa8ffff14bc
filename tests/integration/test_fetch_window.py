"""The fetch window (``worker.consume.fetch_window``): a worker woken while ``train_step`` events
come fast waits ``ITRAIN_BATCH_WAIT_MS`` and takes what came in one fetch; at a low rate it takes
each event at once. Of several workers on one queue, one with a free pool process gathers each
window (``lua/gather.lua``). Real redis-server, real ``celery -A worker worker`` processes.

How fetches are counted: Redis's ``MONITOR`` sees every call of the fetch script that names the
test's queue. How pool jobs are counted: each critical section is recorded
(``ITRAIN_RECORD_TIMINGS``) with the events it trained."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import redis

from producer.keys import ModelKeys
from tests.conftest import ModelFactory, WorkerFactory
from tests.helpers import ClientFactory, Workers, make_events, model_state, statuses, wait_results
from worker.consume.transport import FETCH
from worker.devtools.pacing import send_paced

FAST, SLOW = 1000.0, 20.0  # events a second


@contextmanager
def _fetch_calls(redis_url: str, queue: str) -> Iterator[list[int]]:
    """Counts, while open, the fetch script's calls that name ``queue`` (``[count]``)."""
    count = [0]
    monitor = redis.Redis.from_url(redis_url).monitor()
    monitor.__enter__()
    done = threading.Event()
    sha = FETCH.sha

    def watch() -> None:
        for call in monitor.listen():
            if done.is_set():
                return
            command = call["command"]
            if command.startswith(f"EVALSHA {sha}") and queue in command.split(" "):
                count[0] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        done.set()
        redis.Redis.from_url(redis_url).ping()  # a command for the watcher to see and stop on
        thread.join(10)
        monitor.__exit__()


@dataclass
class Stream:
    """Sends events at a rate to workers and counts their fetches and pool jobs (``__call__``)."""

    redis_url: str
    redis_client: redis.Redis
    start_workers: WorkerFactory
    workers: Workers
    make_model: ModelFactory
    make_client: ClientFactory

    def __call__(self, *, rate: float, events: int, adaptive: bool, count: int = 1) -> tuple[int, int]:
        """Send ``events`` at ``rate`` to ``count`` workers: (the fetches that took them, the pool
        jobs that trained them). Every event trains, once."""
        queue, model = f"itrain.w{uuid.uuid4().hex[:6]}", self.make_model()
        env = {
            "ITRAIN_QUEUE": queue,
            "ITRAIN_BATCH_WAIT_MS": "10",
            "ITRAIN_BATCH_WAIT_ADAPTIVE": "1" if adaptive else "0",
            "ITRAIN_RECORD_TIMINGS": "1",
        }
        self.start_workers(count, concurrency=1, env=env)
        client = self.make_client(self.redis_url, queue=queue)
        with _fetch_calls(self.redis_url, queue) as fetches:
            handles, _ = send_paced(
                make_events(model, events, "w"), lambda part: [client.train_step(part[0])], rate=rate, size=1
            )
            assert statuses(wait_results(client, handles, 60, self.workers)) == {"trained": events}
        assert int(model_state(self.redis_client, model)["step"]) == events
        sections = self.redis_client.lrange(ModelKeys(model).prefix + "timings", 0, -1)
        assert sum(int(row.split()[2]) for row in sections) == events
        jobs = len(sections)
        print(f"\n{events} events at {rate:g}/s, {count} worker(s), adaptive={adaptive}: ", end="")
        print(f"{fetches[0]} fetches, {jobs} pool jobs")
        return fetches[0], jobs


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
    gathered, _ = stream(rate=FAST, events=300, adaptive=True)
    # Then they were taken in at most half as many fetches as events
    assert gathered <= 150
    # And the former rule (each message taken as it comes, then held) fetched more often
    every, _ = stream(rate=FAST, events=300, adaptive=False)
    assert every > gathered


def test_two_workers_gather_in_turns_and_every_event_trains_once(stream: Stream) -> None:
    # Given two workers on one queue, both woken by each window's first message: one whose pool
    # is free gathers the window (the other waits for it to end, or for its own pool to free)
    fetches, jobs = stream(rate=FAST, events=1200, adaptive=True, count=2)
    # Then a window's events made one fetch and one pool job, not one per worker: measured
    # 133-135 jobs, against 158-187 when each worker gathered half of every window (the first
    # ~100 events, before the rate is learnt, take a job or two each)
    assert jobs <= 150
    assert fetches <= 300
    # And each event trained once (``Stream``)


def test_events_that_come_slowly_are_each_taken_at_once(stream: Stream) -> None:
    # Given 30 events at 20/s: a 10 ms window would gather 0.2 of them
    fetches, _ = stream(rate=SLOW, events=30, adaptive=True)
    # Then each was fetched as it came, not waited for (a loaded machine may merge a few)
    assert fetches >= 24
