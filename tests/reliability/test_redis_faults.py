"""Redis faults and restarts never dead-letter a valid event: real redis-servers, real workers.

A give-back by a live worker (a Redis fault under its job, a warm shutdown) is not a delivery
(``worker/consume/redelivery.py``), so however long a fault lasts or however often workers are
restarted, a valid event is trained once when it can be, and never dead-lettered for it. Each
test runs with ``ITRAIN_MAX_DELIVERIES=2``: counted the old way, two give-backs were enough to
dead-letter a message as ``DeliveryLimitError``.

The store faults are made with ``REPLICAOF`` a port where nothing listens on the model store's own
Redis (``ITRAIN_STORE_URL``): it keeps its data, serves reads and answers READONLY to every
write, as a demoted master does, until ``REPLICAOF NO ONE``.
"""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from producer.errors import DeliveryExpiredError
from producer.keys import UNROUTED_DEAD, ModelKeys
from producer.settings import Settings
from tests.helpers import (
    ClientFactory,
    Workers,
    check_each_event_once,
    create_model,
    evidence_env,
    make_events,
    model_state,
    statuses,
    wait_results,
    wait_until,
)
from worker.devtools.embedded_redis import RedisServer, free_port

#: Dead workers' messages come back after this many seconds.
VISIBILITY = 8
#: Few deliveries, a short back-off ladder (0.5, 1, 1, ... s): a fault outlasts the ladder fast.
FAULT_ENV = {
    **evidence_env(VISIBILITY),
    "ITRAIN_MAX_DELIVERIES": "2",
    "ITRAIN_REQUEUE_BACKOFF_MAX": "1",
}


#: Single-event messages waiting when each restarted worker starts.
BACKLOG = 1000
FIRST_TAKEN = "unacked_first_taken"


@pytest.fixture
def queue() -> str:
    return f"itrain-faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store_server() -> Iterator[RedisServer]:
    """The model store on a Redis of its own, so that it alone can be made read-only."""
    server = RedisServer().start()
    yield server
    server.close()


def _read_only(store: redis.Redis) -> None:
    store.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    assert store.info("replication")["role"] == "slave"


def _writable(store: redis.Redis) -> None:
    store.execute_command("REPLICAOF", "NO", "ONE")


def _requeues(workers: Workers, proc: Any) -> int:
    """Give-backs after a Redis fault, as the worker logged them (one line per pool job)."""
    return len(re.findall(r"Redis failed .* requeued in", workers.log(proc)))


def _dead_letters(store: redis.Redis, model: str) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in store.lrange(ModelKeys(model).dead, 0, -1)]


def test_store_read_only_longer_than_the_ladder_dead_letters_nothing(
    redis_url: str,
    redis_client: redis.Redis,
    store_server: RedisServer,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """The store read-only while one ``train_step`` is alone in flight, for many more give-backs
    than ``ITRAIN_MAX_DELIVERIES``; then a stream arrives, still read-only, and goes round too;
    then the fault ends: every event is trained once, nothing is dead-lettered."""
    # Given a worker whose model store is on its own Redis
    store = redis.Redis.from_url(store_server.url)
    env = {**FAULT_ENV, "ITRAIN_QUEUE": queue, "ITRAIN_STORE_URL": store_server.url}
    (w,) = workers.start(1, redis_url=redis_url, env=env, concurrency=1)
    settings = Settings(redis_url=redis_url, store_url=store_server.url)
    model = create_model(store, settings)
    client = make_client(redis_url, queue=queue, store_url=store_server.url, chunk_size=50)
    events = make_events(model, 401, "ro")
    try:
        # When the store turns read-only with one message alone in flight
        _read_only(store)
        handles = [client.train_step(events[0])]
        wait_until(lambda: _requeues(workers, w) >= 5, 60, "five give-backs of the lone message")
        # ... and a stream arrives while it lasts (single events and chunks), and goes round too
        handles += [client.train_step(e) for e in events[1:101]]
        handles += client.train_many(events[101:])
        seen = _requeues(workers, w)
        wait_until(lambda: _requeues(workers, w) >= seen + 5, 60, "five give-backs of the stream")
        assert model_state(store, model)["step"] == 0
    finally:
        # Then the fault ends
        _writable(store)

    results = wait_results(client, handles, timeout=120, workers=workers)
    counts = statuses(results)
    assert counts == {"trained": len(events)}, counts
    evidence = check_each_event_once(store, model, [e["event_id"] for e in events])
    assert evidence["step"] == len(events)
    assert _dead_letters(store, model) == []
    assert store.llen(UNROUTED_DEAD) == 0
    log = workers.log(w)
    assert "DeliveryLimitError" not in log, workers.tail(w)
    assert w.poll() is None
    print(f"\nread-only store: give-backs logged={_requeues(workers, w)} results={dict(counts)}")


def test_message_still_given_back_past_the_marker_window_is_dead_lettered_as_expired(
    redis_url: str,
    store_server: RedisServer,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """Markers kept 12 s and deliveries that may run 4 s (the settings' floor with one delivery:
    (1 + 1) x 4 <= 12): a message is trained until 8 s after it was first taken. The store stays
    read-only past that: when the fault ends the message is answered FAILURE
    (``DeliveryExpiredError``, naming its age and the window) with a dead letter, not trained;
    a message sent after the fault trains."""
    store = redis.Redis.from_url(store_server.url)
    env = {
        **evidence_env(4),
        "ITRAIN_DEDUPE_TTL": "12",
        "ITRAIN_MAX_DELIVERIES": "1",
        "ITRAIN_REQUEUE_BACKOFF_MAX": "1",
        "ITRAIN_QUEUE": queue,
        "ITRAIN_STORE_URL": store_server.url,
    }
    (w,) = workers.start(1, redis_url=redis_url, env=env, concurrency=1)
    settings = Settings(redis_url=redis_url, store_url=store_server.url)
    model = create_model(store, settings)
    client = make_client(redis_url, queue=queue, store_url=store_server.url)
    old, new = make_events(model, 2, "expiry")
    try:
        _read_only(store)
        handle = client.train_step(old)
        wait_until(lambda: _requeues(workers, w) >= 1, 30, "the message to meet the fault")
        # Past the window's 8 s (the first take came after the send): bounded by a condition on
        # the worker's own log, not a fixed sleep; each give-back waits at most 1 s.
        sent = _requeues(workers, w)
        wait_until(lambda: _requeues(workers, w) >= sent + 10, 60, "ten more give-backs")
    finally:
        _writable(store)

    with pytest.raises(DeliveryExpiredError, match=r"first taken \d+ s ago.*12 - 4 = 8 s"):
        handle.get(timeout=60)
    assert [(d["event_id"], d["error"]) for d in _dead_letters(store, model)] == [
        (old["event_id"], "DeliveryExpiredError")
    ]
    assert model_state(store, model)["step"] == 0
    (after,) = wait_results(client, [client.train_step(new)], 60, workers)
    assert after["status"] == "trained"
    assert model_state(store, model)["step"] == 1


def test_worker_restarted_ten_times_under_load_dead_letters_nothing(
    redis_url: str,
    redis_client: redis.Redis,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """A worker stopped with SIGTERM (a warm shutdown: its connection closes and what it holds
    unacknowledged goes back to the queue, first in line) and started again, ten times, while a
    backlog waits: what one gives back the next takes first, more often than
    ``ITRAIN_MAX_DELIVERIES``. The restarted workers take each message at once and then hold it
    up to 3 s for a micro-batch to fill (``ITRAIN_BATCH_WAIT_MS`` under the former rule,
    ``ITRAIN_BATCH_WAIT_ADAPTIVE=0``: with the fetch window a worker waits before taking, and a
    backlog is taken and trained at once), so a SIGTERM finds each holding messages it has not
    run yet; a last worker with the default settings drains the rest. At the end step == N, each event once,
    nothing dead-lettered."""
    settings = Settings(redis_url=redis_url)
    model = create_model(redis_client, settings)
    client = make_client(redis_url, queue=queue)
    env = {**FAULT_ENV, "ITRAIN_QUEUE": queue}
    holding = {**env, "ITRAIN_BATCH_WAIT_MS": "3000", "ITRAIN_BATCH_WAIT_ADAPTIVE": "0"}
    events: list[dict[str, Any]] = []
    handles: list[Any] = []
    gave_back: list[int] = []
    for cycle in range(10):
        # Under load: the backlog topped up to at least BACKLOG single-event messages
        top_up = make_events(model, max(0, BACKLOG - redis_client.llen(queue)), "restart", start=len(events))
        events += top_up
        handles += [client.train_step(e) for e in top_up]
        (w,) = workers.start(1, redis_url=redis_url, env=holding, concurrency=1)
        wait_until(
            lambda: redis_client.hlen("unacked") > 0, 30, f"cycle {cycle}: the worker to take messages"
        )
        w.send_signal(signal.SIGTERM)
        w.wait(60)
        # Messages taken before and now back on the queue (or still recorded, if a give-back failed)
        gave_back.append(redis_client.hlen(FIRST_TAKEN) - redis_client.hlen("unacked"))
    (last,) = workers.start(1, redis_url=redis_url, env=env, concurrency=1)

    results = wait_results(client, handles, timeout=240, workers=workers)
    counts = statuses(results)
    assert set(counts) <= {"trained", "duplicate"}, counts
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in events])
    assert evidence["step"] == len(events)
    assert _dead_letters(redis_client, model) == []
    assert "DeliveryLimitError" not in workers.log(last)
    # The premise: most shutdowns found the worker holding messages, and gave them back.
    assert sum(1 for n in gave_back if n > 0) >= 5, gave_back
    print(f"\nten warm restarts: N={len(events)} results={dict(counts)} back after each stop={gave_back}")
