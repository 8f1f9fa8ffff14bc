"""A worker on several queues (``ITRAIN_QUEUES``): it wakes for a message on any of them, shares
its prefetch window between them, and loses nothing when killed holding messages of two queues.
Real redis-server, real ``celery -A worker worker`` processes."""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from typing import Any

import orjson
import redis
from kombu import Connection, Consumer, Queue  # type: ignore[attr-defined]

from producer.keys import ModelKeys
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope, new_task_id
from tests.conftest import ModelFactory, WorkerFactory
from tests.helpers import (
    ClientFactory,
    Workers,
    check_each_event_once,
    evidence_env,
    make_event,
    make_events,
    statuses,
    wait_results,
    wait_until,
)
from worker.consume.transport import transport_url
from worker.devtools.stack import node_name, start_process, worker_command


def _queues() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"itrain.a{tag}", f"itrain.b{tag}"


def _blocked_in_blmove(client: redis.Redis) -> int:
    """How many connections are blocked in BLMOVE now (CLIENT LIST)."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "blmove" and "b" in c.get("flags", ""))


def _taken_after(client: redis.Redis, since: float, timeout: float = 5.0) -> float:
    """When the worker first took a message after ``since`` (unix seconds): the score of a new
    record in kombu's unacked index, read every millisecond until one appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.zrangebyscore("unacked_index", since, "+inf", withscores=True)
        if rows:
            return float(min(score for _, score in rows))
        time.sleep(0.001)
    raise AssertionError(f"no message taken within {timeout:g} s")


def _held_by_queue(client: redis.Redis, queues: tuple[str, ...]) -> Counter[str]:
    """How many messages of each of ``queues`` are recorded as taken and not acknowledged
    (kombu's unacked hash: [envelope, exchange, routing key])."""
    held: Counter[str] = Counter()
    for record in client.hvals("unacked"):
        _, _, routing_key = orjson.loads(record)
        if routing_key in queues:
            held[routing_key] += 1
    return held


def _hold_lock(client: redis.Redis, model: str) -> None:
    """Take the model's update lock as another worker would: its jobs wait for it."""
    client.set(ModelKeys(model).lock, b"held-by-the-test", px=120_000)


def test_an_idle_worker_on_two_queues_wakes_for_a_message_on_either(
    redis_url: str,
    redis_client: redis.Redis,
    start_workers: WorkerFactory,
    workers: Workers,
    make_model: ModelFactory,
    make_client: ClientFactory,
) -> None:
    # Given an idle worker on two queues, and a model whose events each client sends to one queue
    qa, qb = _queues()
    model = make_model()
    start_workers(1, concurrency=1, env={"ITRAIN_QUEUES": f"{qa},{qb}"})
    on_a, on_b = make_client(redis_url, queue=qa), make_client(redis_url, queue=qb)
    # Then the idle worker blocks on both queues at once (one connection each), not on one of them
    wait_until(lambda: _blocked_in_blmove(redis_client) == 2, 10, "a wait on each queue")
    # When single events arrive on either queue, each time after the worker has gone idle again
    wakes: dict[str, list[float]] = {qa: [], qb: []}
    latencies: dict[str, list[float]] = {qa: [], qb: []}
    for i in range(16):
        client = on_b if i % 2 == 0 else on_a
        time.sleep(0.3)  # idle again: every fetch done, the waits pending
        sent_at, started = time.time(), time.perf_counter()
        handle = client.train_step(make_event(model, i, "wake"))
        wakes[client.settings.queue].append(_taken_after(redis_client, sent_at) - sent_at)
        (result,) = wait_results(client, [handle], 30, workers)
        latencies[client.settings.queue].append(time.perf_counter() - started)
        assert result["status"] == "trained", result
    # Then every event trained, and on either queue the idle worker took it within 50 ms (the
    # typical case), not at its waits' 1 s timeout
    for queue in (qa, qb):
        print(
            f"\n{queue}: push to taken p50 {statistics.median(wakes[queue]) * 1000:.1f} ms, "
            f"max {max(wakes[queue]) * 1000:.1f} ms; push to result p50 "
            f"{statistics.median(latencies[queue]) * 1000:.1f} ms over {len(wakes[queue])} events"
        )
        assert statistics.median(wakes[queue]) < 0.05, (queue, wakes[queue])
    assert redis_client.llen(qa) == redis_client.llen(qb) == 0


def test_a_flooded_queue_cannot_fill_the_prefetch_window(
    redis_url: str,
    redis_client: redis.Redis,
    start_workers: WorkerFactory,
    workers: Workers,
    make_model: ModelFactory,
    make_client: ClientFactory,
) -> None:
    # Given a worker on two queues with a window of 16 messages (one process, multiplier 16): a
    # share of 8 a queue, fetched again once a quarter of it (2) is free, so a queue fed one
    # message at a time may settle at 7 (a fetch took what had arrived, and 1 free is no reason
    # to fetch again; a busy machine does this); and model A's jobs stuck behind its lock, so
    # A's messages pile up in the worker
    share, settled = 8, 8 - 8 // 4 + 1
    qa, qb = _queues()
    model_a, model_b = make_model(), make_model()
    env = {
        "ITRAIN_QUEUES": f"{qa},{qb}",
        "ITRAIN_PREFETCH_MULTIPLIER": "16",
        "ITRAIN_LOCK_WAIT": "60",
        "ITRAIN_LOCK_POLL": "0.02",
    }
    start_workers(1, concurrency=1, env=env)
    on_a, on_b = make_client(redis_url, queue=qa), make_client(redis_url, queue=qb)
    _hold_lock(redis_client, model_a)
    handles_a = [on_a.train_step(event) for event in make_events(model_a, 200, "flood")]
    wait_until(lambda: _held_by_queue(redis_client, (qa, qb))[qa] >= settled, 20, "A's messages taken")
    time.sleep(1.0)  # more fetches, had the window been A's alone
    # Then A holds at most its half of the window, and its queue stays backlogged
    held_a = _held_by_queue(redis_client, (qa, qb))[qa]
    assert settled <= held_a <= share
    assert redis_client.llen(qa) == 200 - held_a
    # When B's events arrive
    handles_b = [on_b.train_step(event) for event in make_events(model_b, 5, "quiet")]
    # Then they are taken at once, into B's half, while A is still backlogged
    wait_until(lambda: _held_by_queue(redis_client, (qa, qb))[qb] == 5, 10, "B's messages taken")
    assert _held_by_queue(redis_client, (qa, qb))[qa] == held_a
    # And once A's lock is free, every event of both trains
    redis_client.delete(ModelKeys(model_a).lock)
    assert statuses(wait_results(on_a, handles_a, 120, workers)) == {"trained": 200}
    assert statuses(wait_results(on_b, handles_b, 60, workers)) == {"trained": 5}


def test_messages_of_two_queues_held_by_a_killed_worker_are_redelivered(
    redis_url: str,
    redis_client: redis.Redis,
    start_workers: WorkerFactory,
    workers: Workers,
    make_model: ModelFactory,
    make_client: ClientFactory,
) -> None:
    # Given a worker on two queues holding messages of both (each model's jobs wait for its lock)
    qa, qb = _queues()
    model_a, model_b = make_model(), make_model()
    env = {
        **evidence_env(visibility=4),
        "ITRAIN_QUEUES": f"{qa},{qb}",
        "ITRAIN_LOCK_WAIT": "60",
        "ITRAIN_LOCK_POLL": "0.02",
    }
    (victim,) = start_workers(1, concurrency=2, env=env)
    on_a, on_b = make_client(redis_url, queue=qa), make_client(redis_url, queue=qb)
    _hold_lock(redis_client, model_a)
    _hold_lock(redis_client, model_b)
    events_a, events_b = make_events(model_a, 300, "ka"), make_events(model_b, 40, "kb")
    handles: list[Any] = on_a.train_many(events_a) + [on_b.train_step(e) for e in events_b]
    # (every message taken: a count read while fetches still come would be overtaken by them)
    wait_until(
        lambda: (
            redis_client.llen(qa) == redis_client.llen(qb) == 0
            and min(_held_by_queue(redis_client, (qa, qb))[q] for q in (qa, qb)) > 0
        ),
        20,
        "every message of both queues taken",
    )
    held = _held_by_queue(redis_client, (qa, qb))
    assert held[qb] == len(events_b)
    # When the worker is killed (its pool too) with those messages taken and not acknowledged
    workers.kill_group(victim)
    assert _held_by_queue(redis_client, (qa, qb)) == held
    # And another worker on the same queues takes over, the locks free again
    redis_client.delete(ModelKeys(model_a).lock, ModelKeys(model_b).lock)
    start_workers(1, concurrency=2, env=env)
    # Then every event of both queues trains, exactly once
    assert statuses(wait_results(on_a, handles, 120, workers)) == {"trained": len(handles)}
    check_each_event_once(redis_client, model_a, [e["event_id"] for e in events_a])
    check_each_event_once(redis_client, model_b, [e["event_id"] for e in events_b])
    wait_until(lambda: not _held_by_queue(redis_client, (qa, qb)), 10, "every record acknowledged")
    print(f"\nheld when killed: {dict(held)}")


def _fetch_once(
    redis_url: str, queues: tuple[str, ...], prefetch: int = 0, fetch_max: int = 10, **options: Any
) -> list[Any]:
    """One fetch of our transport's consumer on ``queues``: the messages it delivered."""
    got: list[Any] = []
    conn = Connection(transport_url(redis_url), transport_options={"fetch_max": fetch_max, **options})
    try:
        consumer = Consumer(
            conn.channel(),
            [Queue(q, routing_key=q) for q in queues],
            callbacks=[lambda body, message: got.append(message)],
            accept=["json"],
        )
        if prefetch:
            consumer.qos(prefetch_count=prefetch)
        consumer.consume()
        conn.drain_events(timeout=2)
        for message in got:
            message.requeue()
    finally:
        conn.release()
    return got


def test_one_fetch_takes_from_every_non_empty_queue(redis_url: str, redis_client: redis.Redis) -> None:
    # Given a flooded queue and a queue with three messages
    qa, qb = _queues()
    envelope = lambda q, i: encode_envelope(TASK_TRAIN_STEP, new_task_id(), [make_event("m", i, q)], q)  # noqa: E731
    redis_client.lpush(qa, *[envelope(qa, i) for i in range(100)])
    redis_client.lpush(qb, *[envelope(qb, i) for i in range(3)])
    # When a consumer on both takes one fetch of 10
    got = _fetch_once(redis_url, (qa, qb))
    # Then B's three came with it, the rest of the fetch from A, each queue in its own order
    by_queue = Counter(m.delivery_info["taken_from"] for m in got)
    assert by_queue == {qa: 7, qb: 3}
    # When the prefetch window is 8 (4 for each queue) and B is empty
    redis_client.delete(qb)
    got = _fetch_once(redis_url, (qa, qb), prefetch=8)
    # Then A fills only its share of the window
    assert Counter(m.delivery_info["taken_from"] for m in got) == {qa: 4}
    redis_client.delete(qa)


def test_a_queue_of_large_messages_gives_its_bytes_and_the_others_their_messages(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a queue flooded with chunks of 256 events (tens of KB each, as train_many's) and a
    # queue with three lone events
    qa, qb = _queues()
    chunks = [
        encode_envelope(TASK_TRAIN_BATCH, new_task_id(), make_events("m", 256, qa, start=256 * i), qa)
        for i in range(20)
    ]
    redis_client.lpush(qa, *chunks)
    redis_client.lpush(
        qb, *[encode_envelope(TASK_TRAIN_STEP, new_task_id(), [make_event("m", i, qb)], qb) for i in range(3)]
    )
    # When a consumer on both takes one fetch of up to 50 messages, 2 chunks' bytes from a queue
    got = _fetch_once(redis_url, (qa, qb), fetch_max=50, fetch_bytes=2 * len(chunks[0]))
    # Then A gave two chunks (not the 47 left by B's three), and B its three in the same fetch
    assert Counter(m.delivery_info["taken_from"] for m in got) == {qa: 2, qb: 3}
    redis_client.delete(qa, qb)


def test_a_worker_given_queues_by_celery_q_consumes_each(
    redis_url: str,
    redis_client: redis.Redis,
    workers: Workers,
    make_model: ModelFactory,
    make_client: ClientFactory,
) -> None:
    # Given a worker started with -Q naming two queues (ITRAIN_QUEUES unset)
    qa, qb = _queues()
    model = make_model()
    name = f"q-{uuid.uuid4().hex[:6]}"
    log = workers.log_dir / f"{name}.log"
    command = [*worker_command(name, 1), "-Q", f"{qa},{qb}"]
    proc = start_process(command, {"ITRAIN_REDIS_URL": redis_url, "OPENBLAS_NUM_THREADS": "1"}, log)
    workers.procs.append(proc)
    workers.names[proc.pid] = node_name(name)
    workers.logs[proc.pid] = log
    workers.wait_ready(redis_url, [proc], 90)
    workers.remember(proc)
    # Then it waits on both, and an event pushed to either trains
    wait_until(lambda: _blocked_in_blmove(redis_client) == 2, 10, "a wait on each queue")
    handles = [
        make_client(redis_url, queue=q).train_step(make_event(model, i, "q")) for i, q in enumerate((qa, qb))
    ]
    assert statuses(wait_results(make_client(redis_url), handles, 60, workers)) == {"trained": 2}
