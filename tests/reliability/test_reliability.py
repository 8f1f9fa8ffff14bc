"""Reliability under failure: real redis-server, real ``celery -A worker worker`` processes.

What is checked, scenario by scenario (each docstring says how):
1. a pool child, then a whole worker, SIGKILLed in the middle of a stream of unique events;
2. the lock holder SIGSTOPped past ``ITRAIN_LOCK_TIMEOUT``: its stale commit is fenced and redone;
3. redis-server kill -9 and restarted (AOF, fsync always) under load;
4. one event sent ten times;
5. a flood of hostile messages pushed straight onto the broker list; broken envelopes; compressed
   bodies (a zlib bomb among them).

The exactly-once evidence is read from Redis itself (``check_each_event_once``): the done
markers of the events are exactly the steps 1..step, and the training history lists every step
and every event once. Every wait is bounded; no test measures speed.
"""

from __future__ import annotations

import base64
import math
import os
import pickle
import random
import signal
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.errors import PublishError
from producer.keys import UNROUTED_DEAD, ModelKeys
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope, new_task_id
from producer.settings import Settings
from tests.helpers import (
    ClientFactory,
    Workers,
    check_each_event_once,
    children,
    create_model,
    descendants,
    evidence_env,
    make_events,
    model_state,
    statuses,
    wait_results,
    wait_until,
)
from worker.devtools.embedded_redis import RedisServer, free_port
from worker.store.model_store import Store

#: Dead workers' messages come back after this many seconds (ITRAIN_DEDUPE_TTL stays above it).
VISIBILITY = 8
BASE_ENV = evidence_env(VISIBILITY)
#: hidden=4096 costs ~0.3 ms per exact SGD step: a few thousand events keep a worker busy for
#: seconds, long enough to kill or stop it in the middle of a batch.
SLOW = {"hidden": 4096}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def queue() -> str:
    """A queue of the test's own, so no message of another test can reach its workers."""
    return f"itrain-rel-{uuid.uuid4().hex[:8]}"


def _stream(client: TrainingClient, events: list[dict[str, Any]], singles: int) -> list[Any]:
    """The first ``singles`` events as ``train_step`` messages (micro-batched by the worker),
    the rest through ``train_many`` (chunks of ``ITRAIN_CHUNK_SIZE``)."""
    handles = [client.train_step(e) for e in events[:singles]]
    handles += client.train_many(events[singles:])
    return handles


# -- 1. a worker killed -----------------------------------------------------------------------------

N_KILL = 6000


def _stream_to_one_worker(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
    tag: str,
    *,
    concurrency: int,
) -> tuple[Any, str, TrainingClient, list[dict[str, Any]], list[Any]]:
    """One worker on the test's queue, a slow model, N_KILL unique events sent; returns once a
    quarter of them is trained: (worker, model, client, events, handles)."""
    env = {**BASE_ENV, "ITRAIN_QUEUE": queue}
    (w,) = workers.start(1, redis_url=redis_url, env=env, concurrency=concurrency)
    model = create_model(redis_client, settings, **SLOW)
    client = make_client(redis_url, queue=queue, chunk_size=100)
    events = make_events(model, N_KILL, tag)
    handles = _stream(client, events, singles=300)
    wait_until(lambda: model_state(redis_client, model)["step"] >= N_KILL // 4, 90, "a quarter of the stream")
    return w, model, client, events, handles


def test_pool_child_killed_mid_batch_every_event_trained_once(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """SIGKILL the pool child while it holds the model's lock (so in the middle of training a
    batch), a quarter into a stream of N unique events.

    The worker runs one pool child, so the lock key exists only while that child is inside its
    critical section: the kill lands mid-batch, deterministically. The worker's main process
    sees the child die (WorkerLostError) and runs each of the child's messages again alone
    (no visibility timeout involved); the pool starts a new child. Events the dead child had
    committed come back as ``duplicate``, the others are trained by the new child: step == N,
    each event once, every handle resolves, nothing is dead-lettered (a lone re-run that
    finishes clears its message).
    """
    w, model, client, events, handles = _stream_to_one_worker(
        redis_url, redis_client, settings, workers, make_client, queue, "child", concurrency=1
    )
    lock_key = ModelKeys(model).lock
    (victim,) = workers.pool(w)
    wait_until(lambda: redis_client.exists(lock_key), 30, "the child to take the lock", interval=0.001)
    os.kill(victim, signal.SIGKILL)
    step_at_kill = model_state(redis_client, model)["step"]

    results = wait_results(client, handles, timeout=120, workers=workers)

    counts = statuses(results)
    assert set(counts) <= {"trained", "duplicate"}, counts
    assert step_at_kill < N_KILL, "the kill came after the stream had ended"
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in events])
    assert evidence["step"] == N_KILL
    assert evidence["marked"] == N_KILL
    assert counts["trained"] + counts["duplicate"] == N_KILL
    # The worker survived the loss of a child and requeued the child's batch itself.
    assert w.poll() is None
    log = workers.log(w)
    assert f"pid:{victim} exited with 'signal 9" in log, workers.tail(w)
    assert "not finished" in log, workers.tail(w)
    assert "running each alone" in log, workers.tail(w)
    assert "dead-lettered" not in log, workers.tail(w)
    assert victim not in children(w.pid)
    assert len(children(w.pid)) == 1, "the pool did not replace its child"
    print(f"\nchild kill: N={N_KILL} step_at_kill={step_at_kill} results={dict(counts)}")


def test_whole_worker_killed_replacement_trains_the_rest_once(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """SIGKILL a whole worker (main process and pool children, one process group) a quarter into
    a stream of N unique events, then start a replacement worker.

    Everything the dead worker had taken from the queue (prefetched, buffered, in its pool) sits
    in the transport's ``unacked`` hash; the contract says it is redelivered after
    ``ITRAIN_VISIBILITY_TIMEOUT`` seconds. The wait is bounded by that plus generous room for a
    worker start and the training itself. step == N, each event once, every handle resolves.
    """
    w1, model, client, events, handles = _stream_to_one_worker(
        redis_url, redis_client, settings, workers, make_client, queue, "whole", concurrency=2
    )
    group = [w1.pid, *descendants(w1.pid)]
    workers.kill_group(w1)
    killed_at = time.monotonic()
    step_at_kill = model_state(redis_client, model)["step"]
    assert step_at_kill < N_KILL, "the kill came after the stream had ended"
    orphans = redis_client.hlen("unacked")
    assert orphans > 0, "the killed worker held no unacknowledged message"

    (w2,) = workers.start(1, redis_url=redis_url, env={**BASE_ENV, "ITRAIN_QUEUE": queue}, concurrency=2)
    results = wait_results(client, handles, timeout=VISIBILITY + 60, workers=workers)
    recovered_after = time.monotonic() - killed_at

    counts = statuses(results)
    assert set(counts) <= {"trained", "duplicate"}, counts
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in events])
    assert evidence["step"] == N_KILL
    assert evidence["marked"] == N_KILL
    assert w2.poll() is None
    print(
        f"\nworker kill: N={N_KILL} killed pids={group} step_at_kill={step_at_kill} "
        f"orphaned messages={orphans} results={dict(counts)} all resolved {recovered_after:.1f} s after kill"
    )


# -- 2. lock expiry -----------------------------------------------------------------------------


def test_paused_lock_holder_commit_is_fenced_and_redone(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
) -> None:
    """SIGSTOP the worker holding the model's lock past ``ITRAIN_LOCK_TIMEOUT`` (1 s), let another
    worker commit, SIGCONT: the paused worker's commit must be refused (its version is stale)
    and redone on the fresh weights.

    Made deterministic: workers A and B train the same model but consume different queues, so A
    alone gets the first batch (one message of K events on a slow model, ~0.3 s under the lock)
    and B alone the second. A is stopped (main process and pool child) 50 ms after the lock key
    appears, that is after its read and before its commit (the version must not have moved);
    once the lock has expired B trains the second batch of M events; then A is resumed.
    Evidence: A's log says ``commit refused``; A's K events got steps M+1..M+K (its stale
    commit never landed); step == K + M, each event once.
    """
    qa, qb = (f"itrain-rel-{x}-{uuid.uuid4().hex[:6]}" for x in "ab")
    env = {
        **BASE_ENV,
        "ITRAIN_LOCK_TIMEOUT": "1",
        "ITRAIN_VISIBILITY_TIMEOUT": "120",
        "ITRAIN_DEDUPE_TTL": "900",  # at least (ITRAIN_MAX_DELIVERIES + 1) x 120 s
    }
    (a,) = workers.start(1, redis_url=redis_url, env={**env, "ITRAIN_QUEUE": qa}, concurrency=1)
    (b,) = workers.start(1, redis_url=redis_url, env={**env, "ITRAIN_QUEUE": qb}, concurrency=1)
    model = create_model(redis_client, settings, **SLOW)
    k_events, m_events = 1000, 300
    client_a = make_client(redis_url, queue=qa, chunk_size=k_events)
    client_b = make_client(redis_url, queue=qb)
    lock_key = ModelKeys(model).lock
    first = make_events(model, k_events, "held")
    second = make_events(model, m_events, "other")
    version0 = model_state(redis_client, model)["version"]

    h_first = client_a.train_many(first)  # one message, for A
    wait_until(lambda: redis_client.exists(lock_key), 60, "A to take the lock", interval=0.001)
    time.sleep(0.05)
    workers.signal_group(a, signal.SIGSTOP)
    try:
        assert model_state(redis_client, model)["version"] == version0, "A committed before it was stopped"
        wait_until(lambda: not redis_client.exists(lock_key), 5, "A's lock to expire")
        h_second = client_b.train_many(second)
        wait_until(
            lambda: model_state(redis_client, model)["step"] >= m_events, 60, "B to commit the second batch"
        )
        assert model_state(redis_client, model)["step"] == m_events
    finally:
        workers.signal_group(a, signal.SIGCONT)

    results = wait_results(client_a, h_first + h_second, timeout=60, workers=workers)
    counts = statuses(results)
    assert counts == {"trained": k_events + m_events}, counts
    first_steps = sorted(r["step"] for r in results[:k_events])
    assert first_steps == list(range(m_events + 1, m_events + k_events + 1))
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in first + second])
    assert evidence["step"] == k_events + m_events
    refused = [line for line in workers.log(a).splitlines() if "commit refused" in line]
    assert refused, workers.tail(a)
    assert "commit refused" not in workers.log(b)
    print(
        f"\nlock expiry: K={k_events} M={m_events} step={evidence['step']} "
        f"refusals logged by A: {len(refused)}"
    )


# -- 3. redis restart -------------------------------------------------------------------------------


class _Producer(threading.Thread):
    """Publishes chunks and single events until stopped; records every call's outcome and time."""

    def __init__(self, client: TrainingClient, model: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.model = model
        self.stop = threading.Event()
        self.handles: list[tuple[str, Any]] = []  # (event id, handle) of accepted events
        self.messages: list[list[Any]] = []  # the handles of each accepted call (one message each)
        self.attempted: list[str] = []
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.unexpected: list[BaseException] = []
        self.longest = 0.0
        self.calls = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            single = i % 4 == 3
            batch = make_events(self.model, 1 if single else 25, "restart", start=i * 25)
            self.attempted += [e["event_id"] for e in batch]
            t0 = time.monotonic()
            try:
                got = [self.client.train_step(batch[0])] if single else self.client.train_many(batch)
                self.handles += list(zip([e["event_id"] for e in batch], got, strict=True))
                self.messages.append(got)
            except PublishError as exc:
                self.errors[type(exc).__name__] += 1
                if len(self.error_samples) < 3:
                    self.error_samples.append(str(exc))
            except BaseException as exc:
                self.unexpected.append(exc)
            self.longest = max(self.longest, time.monotonic() - t0)
            self.calls += 1
            i += 1
            time.sleep(0.02)


def _settle(
    admin: redis.Redis, model: str, queue: str, handles: list[Any], timeout: float, quiet: float = 5.0
) -> set[str]:
    """Wait until every handle has a result, or until nothing can deliver the rest any more (the
    queue and kombu's ``unacked`` hash are empty and the model's step stays put for ``quiet``
    seconds), or ``timeout``. Returns the ids still without a result."""
    deadline = time.monotonic() + timeout
    quiet_since, last = time.monotonic(), (-1, -1, -1)
    while True:
        pending: set[str] = set()
        for i in range(0, len(handles), 5000):
            part = handles[i : i + 5000]
            raw = admin.mget([h.key for h in part])
            pending.update(h.id for h, v in zip(part, raw, strict=True) if v is None)
        now = time.monotonic()
        if not pending or now > deadline:
            return pending
        state = (model_state(admin, model)["step"], admin.llen(queue), admin.hlen("unacked"))
        if state != last or state[1:] != (0, 0):
            quiet_since, last = now, state
        elif now - quiet_since > quiet:
            return pending
        time.sleep(0.2)


def test_redis_killed_and_restarted_under_load(
    tmp_path: Path, workers: Workers, make_client: ClientFactory
) -> None:
    """kill -9 a redis-server (appendonly, appendfsync always) under load and restart it on the
    same port with the same data directory.

    * workers resume by themselves: the same processes are alive and train what comes after;
    * no committed update is lost and none counted twice: the done markers of all attempted
      events are exactly steps 1..step, the history lists each event once, and a ``trained``
      result names the step its marker holds;
    * every accepted event is trained (``trained``, or ``duplicate`` when its first run committed
      but its ack died with the server), waiting up to ``ITRAIN_VISIBILITY_TIMEOUT`` and more for
      messages a worker held when the server died. None is lost: our transport takes a message
      off the list and records it as unacknowledged in one script (``lua/fetch.lua``), so there is
      no instant at which a message is neither queued nor recorded (kombu's BRPOP and second
      command lost one now and then);
    * producer calls made during the outage raise ``PublishError`` or succeed, each within a
      bound derived from ``ITRAIN_PUBLISH_TIMEOUT``; none hangs (the producer thread is joined
      with a timeout).
    """
    publish_timeout = 2.0
    call_bound = 3 * publish_timeout + 2.0
    port = free_port()
    data = tmp_path / "redis-data"
    server = RedisServer(port, data_dir=data, appendonly=True, appendfsync="always").start()
    producer: _Producer | None = None
    try:
        url = server.url
        settings = Settings(redis_url=url, publish_timeout=publish_timeout)
        admin = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        env = {**BASE_ENV, "ITRAIN_PUBLISH_TIMEOUT": str(publish_timeout)}
        procs = workers.start(2, redis_url=url, env=env, concurrency=1)
        pids_before = {p.pid: set(children(p.pid)) for p in procs}
        model = create_model(admin, settings, hidden=256)
        client = make_client(url, publish_timeout=publish_timeout)
        producer = _Producer(client, model)
        producer.start()
        wait_until(lambda: model_state(admin, model)["step"] >= 300, 60, "training under load")

        step_before = model_state(admin, model)["step"]
        server.kill()
        killed_calls = producer.calls
        time.sleep(3.0)
        outage_calls = producer.calls - killed_calls
        server = RedisServer(port, data_dir=data, appendonly=True, appendfsync="always").start()
        admin = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        assert model_state(admin, model)["step"] >= step_before, "the restarted server lost commits"
        time.sleep(3.0)
        producer.stop.set()
        producer.join(timeout=call_bound + 5)
        assert not producer.is_alive(), "a producer call hangs after the outage"
        assert not producer.unexpected, producer.unexpected
        assert producer.longest <= call_bound, f"a publish took {producer.longest:.1f} s"

        accepted = [h for _, h in producer.handles]
        pending = _settle(admin, model, settings.queue, accepted, timeout=VISIBILITY + 60)
        lost = [m for m in producer.messages if any(h.id in pending for h in m)]
        assert not lost, (
            f"{len(lost)} accepted message(s) ({len(pending)} events) never trained; "
            f"queue={admin.llen(settings.queue)} unacked={admin.hlen('unacked')}\n{workers.tails()}"
        )
        done = [(e, h) for e, h in producer.handles if h.id not in pending]
        results = client.wait_all([h for _, h in done], timeout=10)
        counts = statuses(results)
        assert set(counts) <= {"trained", "duplicate"}, counts
        evidence = check_each_event_once(admin, model, producer.attempted)
        markers = evidence["markers"]
        for (event_id, _), result in zip(done, results, strict=True):
            assert event_id in markers, f"accepted event {event_id} was never trained"
            if result["status"] == "trained":
                assert result["step"] == markers[event_id]
        assert evidence["step"] >= len(done)
        # The workers came back by themselves: same processes, and they train new events.
        after = make_events(model, 50, "after-restart")
        results_after = wait_results(client, client.train_many(after), 30, workers)
        assert statuses(results_after) == {"trained": 50}
        for proc in procs:
            assert proc.poll() is None, workers.tail(proc)
        replaced = {p.pid for p in procs if set(children(p.pid)) != pids_before[p.pid]}
        print(
            f"\nredis restart: attempted={len(producer.attempted)} accepted={len(accepted)} "
            f"step={evidence['step']} results={dict(counts)} "
            f"publish errors={dict(producer.errors)} "
            f"calls during outage={outage_calls} longest call={producer.longest:.2f} s "
            f"workers with replaced pool children={sorted(replaced)} "
            f"sample error={producer.error_samples[:1]}"
        )
    finally:
        if producer is not None:
            producer.stop.set()
        workers.close()
        server.close()


# -- 4. duplicates ----------------------------------------------------------------------------------


def test_same_event_ten_times_moves_step_by_one(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """One event_id sent 10 times trains once; the other 9 results are ``duplicate``: ten
    ``train_step`` calls at once (they may share a micro-batch), ten awaited one by one (each a
    batch of its own, deduplicated by the done marker), and ten copies in one ``train_many``."""
    workers.start(1, redis_url=redis_url, env={**BASE_ENV, "ITRAIN_QUEUE": queue}, concurrency=2)
    model = create_model(redis_client, settings)
    client = make_client(redis_url, queue=queue)
    at_once, one_by_one, in_batch = make_events(model, 3, "dup")

    results = wait_results(client, [client.train_step(at_once) for _ in range(10)], 60, workers)
    serial = [wait_results(client, [client.train_step(one_by_one)], 60, workers)[0] for _ in range(10)]
    batch = wait_results(client, client.train_many([in_batch] * 10), 60, workers)

    for group, event in ((results, at_once), (serial, one_by_one), (batch, in_batch)):
        counts = statuses(group)
        assert counts == {"trained": 1, "duplicate": 9}, counts
        assert all(r["event_id"] == event["event_id"] for r in group)
    assert serial[0]["status"] == "trained"
    assert batch[0]["status"] == "trained"
    evidence = check_each_event_once(
        redis_client, model, [e["event_id"] for e in (at_once, one_by_one, in_batch)]
    )
    assert evidence["step"] == 3
    stats = client.stats(model)
    assert stats["step"] == 3
    assert stats["interactions"] == 3


# -- 5. hostile input -------------------------------------------------------------------------------

DEAD_MAX = 300


class _Unpickled:
    """Unpickling this would create the marker file: proof that nothing unpickles a message."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _envelope(
    task: str,
    task_id: str,
    body: bytes,
    queue: str,
    *,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
    headers: dict[str, Any] | None = None,
) -> bytes:
    """The producer's envelope with a hand-made body (base64, as kombu's Redis transport has it)."""
    env = orjson.loads(encode_envelope(task, task_id, [], queue))
    env["body"] = base64.b64encode(body).decode()
    env["content-type"] = content_type
    env["content-encoding"] = content_encoding
    env["headers"].update(headers or {})
    return orjson.dumps(env)


def _proto2(args: Any, kwargs: Any = None) -> bytes:
    return orjson.dumps(
        [args, kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )


def _hostile_catalogue(model: str) -> dict[str, tuple[Callable[[int], tuple[str, bytes]], str, bool]]:
    """name -> (make(i) -> (task, body) or a full envelope, cause the error must name, routed).

    ``routed``: the error is about one event object naming the (existing) model, so it lands in
    the model's dead-letter list and ``failures`` counter; the others go to the unrouted list.
    """

    def ev(i: int, **fields: Any) -> dict[str, Any]:
        base = {
            "event_id": f"bad-{i}",
            "user_id": f"SECRET-USER-{i}",
            "action_type": "click",
            "timestamp": 1_700_000_000 + i,
            "model": model,
        }
        base.update(fields)
        return {k: v for k, v in base.items() if v is not _DROP}

    def single(event: Any) -> tuple[str, bytes]:
        return TASK_TRAIN_STEP, _proto2([event])

    good = ev(0)
    good_json = orjson.dumps(good).decode()
    return {
        "truncated_json": (lambda i: (TASK_TRAIN_STEP, _proto2([ev(i)])[:-7]), "not valid JSON", False),
        "nan_literal": (
            lambda i: (TASK_TRAIN_STEP, f'[[{good_json[:-1]}, "label": NaN}}], {{}}, {{}}]'.encode()),
            "NaN",
            True,
        ),
        "infinity_1e400": (
            lambda i: (TASK_TRAIN_STEP, f'[[{good_json[:-1]}, "label": 1e400}}], {{}}, {{}}]'.encode()),
            "infinity",
            True,
        ),
        "neg_infinity_ts": (
            lambda i: (TASK_TRAIN_STEP, b'[[{"user_id": "u", "timestamp": -1e400}], {}, {}]'),
            "infinity",
            False,
        ),
        "user_id_int": (lambda i: single(ev(i, user_id=12345)), "user_id", True),
        "timestamp_str": (lambda i: single(ev(i, timestamp="yesterday")), "timestamp", True),
        "timestamp_huge": (lambda i: single(ev(i, timestamp=1e300)), "timestamp", True),
        "context_list_value": (lambda i: single(ev(i, context={"k": [1, 2]})), "context.k", True),
        "context_nested": (lambda i: single(ev(i, context={"k": {"a": 1}})), "context.k", True),
        "label_str": (lambda i: single(ev(i, label="high")), "label", True),
        "label_out_of_range": (lambda i: single(ev(i, label=1e308)), "label", True),
        "label_wrong_length": (lambda i: single(ev(i, label=[0.5, 0.5])), "label has 2 value", True),
        "unknown_action": (lambda i: single(ev(i, action_type="teleport")), "teleport", True),
        "event_is_list": (lambda i: single([1, 2, 3]), "JSON object", False),
        "event_is_string": (lambda i: single("click"), "JSON object", False),
        "long_user_id": (lambda i: single(ev(i, user_id="x" * 20_000)), "user_id", True),
        "long_action": (lambda i: single(ev(i, action_type="y" * 5_000)), "action_type", True),
        "long_event_id": (lambda i: single(ev(i, event_id="e" * 5_000)), "event_id", True),
        "big_context": (
            lambda i: single(ev(i, context={f"k{j}": j for j in range(500)})),
            "context",
            True,
        ),
        "long_context_value": (lambda i: single(ev(i, context={"k": "v" * 50_000})), "context.k", True),
        "unknown_field": (lambda i: single(ev(i, evil="rm -rf /")), "evil", True),
        "missing_user_id": (lambda i: single(ev(i, user_id=_DROP)), "user_id", True),
        "bad_model_name": (lambda i: single(ev(i, model="../../etc/passwd")), "model", False),
        "kwargs": (lambda i: (TASK_TRAIN_STEP, _proto2([ev(i)], {"x": 1})), "keyword", False),
        "two_args": (lambda i: (TASK_TRAIN_STEP, _proto2([ev(i), ev(i)])), "exactly one argument", False),
        "not_protocol_2": (lambda i: (TASK_TRAIN_STEP, orjson.dumps({"args": [ev(i)]})), "protocol 2", False),
        "batch_bad_shape": (
            lambda i: (TASK_TRAIN_BATCH, _proto2([[f"x{i}"], [ev(i)], 3])),
            "a list of ids and a list of events",
            False,
        ),
    }


_DROP = object()


def test_hostile_flood_fails_cleanly_and_trains_the_valid_events(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    store: Store,
    tmp_path: Path,
) -> None:
    """>= 10,000 messages LPUSHed straight onto the ``itrain`` list: valid events interleaved
    with malformed JSON, NaN and infinities, wrong types, oversized strings, contexts and bodies,
    unknown fields, a pickle message that would create a file if unpickled, and ``train_batch``
    messages mixing good and bad events.

    Every valid event is trained (step == valid unique events, each once); every bad one is a
    FAILURE whose message names the cause; the dead-letter lists stay within
    ``ITRAIN_DEAD_LETTER_MAX`` and the ``failures`` counter counts the routed ones; no dead letter
    holds a raw user id; the weights are finite; the marker file never appears; the same worker
    processes are alive at the end.
    """
    q = "itrain"
    env = {**BASE_ENV, "ITRAIN_DEAD_LETTER_MAX": str(DEAD_MAX), "ITRAIN_QUEUE": q}
    (w,) = workers.start(1, redis_url=redis_url, env=env, concurrency=2)
    pids_before = {w.pid, *descendants(w.pid)}
    model = create_model(redis_client, settings)
    client = make_client(redis_url, queue=q)
    marker = tmp_path / "UNPICKLED"
    catalogue = _hostile_catalogue(model)
    rng = random.Random(20261)

    messages: list[bytes] = []
    expect: dict[str, tuple[str, str, bool]] = {}  # task id -> (kind, cause, routed)
    valid_ids: dict[str, str] = {}  # task id -> event id
    valid = make_events(model, 6000, "flood-ok")
    for e in valid[:5000]:
        tid = new_task_id()
        valid_ids[tid] = e["event_id"]
        messages.append(encode_envelope(TASK_TRAIN_STEP, tid, [e], q))
    per_kind = 180
    for kind, (make, cause, routed) in catalogue.items():
        for i in range(per_kind):
            tid = new_task_id()
            task, body = make(len(expect) + i)
            messages.append(_envelope(task, tid, body, q))
            expect[tid] = (kind, cause, routed)
    pickle_body = pickle.dumps(((_Unpickled(marker),), {}, {}), protocol=2)
    for _ in range(20):
        tid = new_task_id()
        messages.append(
            _envelope(
                TASK_TRAIN_STEP,
                tid,
                pickle_body,
                q,
                content_type="application/x-python-serialize",
                content_encoding="binary",
            )
        )
        expect[tid] = ("pickle", "content type", False)
    big_event = {"user_id": "u", "action_type": "click", "timestamp": 0, "pad": "p" * 1_200_000}
    for _ in range(3):
        tid = new_task_id()
        messages.append(_envelope(TASK_TRAIN_STEP, tid, _proto2([big_event]), q))
        expect[tid] = ("oversized_body", "ITRAIN_MAX_MESSAGE_BYTES", False)
    # train_batch messages with 5 good and 5 bad events each: one result per event.
    batch_bad = 0
    for j, start in enumerate(range(5000, 6000, 5)):
        ids, payloads = [], []
        for e in valid[start : start + 5]:
            tid = new_task_id()
            valid_ids[tid] = e["event_id"]
            ids.append(tid)
            payloads.append(e)
        for i in range(5):
            tid = new_task_id()
            ids.append(tid)
            payloads.append(
                {"user_id": f"SECRET-USER-b{j}-{i}", "action_type": "", "timestamp": 0, "model": model}
            )
            expect[tid] = ("batch_empty_action", "action_type", True)
            batch_bad += 1
        messages.append(encode_envelope(TASK_TRAIN_BATCH, new_task_id(), [ids, payloads], q))
    assert len(messages) >= 10_000
    rng.shuffle(messages)

    pipe = redis_client.pipeline(transaction=False)
    for i, m in enumerate(messages):
        pipe.lpush(q, m)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()

    all_ids = list(valid_ids) + list(expect)
    handles = [client.app.AsyncResult(tid) for tid in all_ids]
    kinds = ["valid"] * len(valid_ids) + [kind for kind, _, _ in expect.values()]
    got = wait_results(client, handles, timeout=120, workers=workers, labels=kinds)
    results = dict(zip(all_ids, got, strict=True))

    # Valid events: trained, once each.
    valid_results = [results[t] for t in valid_ids]
    assert statuses(valid_results) == {"trained": len(valid_ids)}
    evidence = check_each_event_once(redis_client, model, list(valid_ids.values()))
    assert evidence["step"] == len(valid_ids) == 6000
    # Bad messages: FAILURE naming the cause.
    wrong: list[str] = []
    by_kind: Counter[str] = Counter()
    for tid, (kind, cause, _) in expect.items():
        r = results[tid]
        by_kind[kind] += 1
        if isinstance(r, dict) or cause.lower() not in str(r).lower():
            wrong.append(f"{kind}: expected FAILURE naming {cause!r}, got {r!r:.300}")
    assert not wrong, f"{len(wrong)} bad message(s) not failed as expected:\n" + "\n".join(wrong[:20])
    assert not marker.exists(), "a pickle message was unpickled"
    # Dead letters: bounded, counted, no raw user ids.
    routed = sum(1 for _, _, r in expect.values() if r)
    stats = client.stats(model)
    assert stats["failures"] == routed
    dead = redis_client.lrange(ModelKeys(model).dead, 0, -1)
    assert len(dead) == min(DEAD_MAX, routed)
    assert redis_client.llen(UNROUTED_DEAD) <= DEAD_MAX
    leaked = [d for d in dead + redis_client.lrange(UNROUTED_DEAD, 0, -1) if b"SECRET-USER" in d]
    assert not leaked, f"a dead letter holds a raw user id: {leaked[0][:300]!r}"
    assert not redis_client.exists(ModelKeys("../../etc/passwd").ckpt)
    # Weights finite, same workers alive.
    ckpt = store.load(model)
    assert ckpt is not None
    assert np.isfinite(ckpt.theta).all()
    assert math.isfinite(stats["loss_ema"])
    assert w.poll() is None
    assert {w.pid, *descendants(w.pid)} == pids_before, "a worker process was lost and replaced"
    assert "WorkerLostError" not in workers.log(w)
    print(
        f"\nhostile flood: messages={len(messages)} valid events={len(valid_ids)} bad={len(expect)} "
        f"step={evidence['step']} failures counter={stats['failures']} dead={len(dead)} "
        f"unrouted dead={redis_client.llen(UNROUTED_DEAD)}"
    )


def test_hostile_envelopes_do_not_stop_the_worker(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """Broken envelopes (not JSON, no headers, body not base64, an unknown task name, a task id
    that is not a string) pushed straight onto the queue cannot carry a result, but they must not
    stop or kill the worker: valid events pushed after them are all trained by the same processes."""
    (w,) = workers.start(1, redis_url=redis_url, env={**BASE_ENV, "ITRAIN_QUEUE": queue}, concurrency=2)
    pids_before = {w.pid, *descendants(w.pid)}
    model = create_model(redis_client, settings)
    client = make_client(redis_url, queue=queue)
    # The envelopes' event names a model that does not exist: whatever becomes of a broken
    # envelope, it cannot move this test's model.
    good = make_events(f"absent-{uuid.uuid4().hex[:8]}", 1, "x")[0]
    broken: list[bytes] = [
        b"\x00\xffnot json at all",
        b"[1, 2, 3]",
        orjson.dumps({"body": "e30=", "properties": {"body_encoding": "base64"}}),
    ]
    env = orjson.loads(encode_envelope(TASK_TRAIN_STEP, new_task_id(), [good], queue))
    env["body"] = "%%% not base64 %%%"
    broken.append(orjson.dumps(env))
    env = orjson.loads(encode_envelope("itrain.no_such_task", new_task_id(), [good], queue))
    broken.append(orjson.dumps(env))
    env = orjson.loads(encode_envelope(TASK_TRAIN_STEP, new_task_id(), [good], queue))
    env["headers"]["id"] = {"not": "a string"}
    env["properties"]["correlation_id"] = None
    broken.append(orjson.dumps(env))
    for m in broken:
        redis_client.lpush(queue, m)
    events = make_events(model, 200, "after-broken")
    handles = client.train_many(events)
    results = wait_results(client, handles, timeout=60, workers=workers)
    assert statuses(results) == {"trained": 200}
    assert model_state(redis_client, model)["step"] == 200
    assert w.poll() is None
    assert {w.pid, *descendants(w.pid)} == pids_before, "a worker process was lost and replaced"


def _hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def test_compressed_messages_fail_cleanly_and_are_never_inflated(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    workers: Workers,
    make_client: ClientFactory,
    queue: str,
) -> None:
    """Messages with a ``compression`` header are refused (the contract: JSON only), and the
    refusal must come before any decompression: a zlib bomb (a ~200 KB body inflating to 256 MiB)
    must not raise the worker processes' peak memory (VmHWM) by anything near its inflated size,
    and a compressed body that is not valid zlib must still end as a FAILURE result naming the
    cause (not vanish with no result)."""
    (w,) = workers.start(1, redis_url=redis_url, env={**BASE_ENV, "ITRAIN_QUEUE": queue}, concurrency=1)
    model = create_model(redis_client, settings)
    client = make_client(redis_url, queue=queue)
    event = make_events(model, 1, "zip")[0]
    pids = [w.pid, *descendants(w.pid)]
    peak_before = sum(_hwm(p) for p in pids)
    inflated = 256 * 2**20
    bomb_body = _proto2([event])[:-1] + b" " * inflated + b"]"
    cases = {
        "valid_zlib": zlib.compress(_proto2([event])),
        "not_zlib": b"this is not zlib data",
        "bomb": zlib.compress(bomb_body, 9),
    }
    del bomb_body
    assert len(cases["bomb"]) < 1_048_576
    ids = {}
    for kind, body in cases.items():
        ids[kind] = new_task_id()
        redis_client.lpush(
            queue, _envelope(TASK_TRAIN_STEP, ids[kind], body, queue, headers={"compression": "zlib"})
        )
    handles = [client.app.AsyncResult(t) for t in ids.values()]
    results = dict(zip(ids, wait_results(client, handles, 60, workers, labels=list(ids)), strict=True))

    for kind, r in results.items():
        assert not isinstance(r, dict), f"{kind}: {r}"
        assert "compress" in str(r).lower(), f"{kind}: {r!r}"
    assert model_state(redis_client, model)["step"] == 0
    grown = sum(_hwm(p) for p in [w.pid, *descendants(w.pid)]) - peak_before
    assert grown < inflated // 4, f"worker peak memory grew by {grown / 2**20:.0f} MiB: the bomb was inflated"
    assert w.poll() is None
