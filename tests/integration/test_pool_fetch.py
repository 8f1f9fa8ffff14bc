"""``ITRAIN_POOL_FETCH=1``: each pool process fetches, trains and acknowledges its own messages
(``worker.consume.pool_fetch``). Real redis-server, real ``celery -A worker worker`` processes.

* Two workers of two pool processes each train a stream of ``train_step`` events from 4
  threads, a ``train_many`` batch and a ``predict`` on the same queue: every event trains exactly
  once (the done markers and the history say so), every message is acknowledged (nothing left in
  the unacked records), Flower's event receiver sees every training task end with its name, and
  the main processes take nothing off the queue.
* A pool process killed in the middle of a stream: billiard starts another, whose fetcher goes
  on; the messages the dead one held come back after the visibility timeout; each event trains
  once and every handle is answered.
* A warm shutdown in the middle of a stream: the fetchers finish their batch and stop; nothing is
  left to the visibility timeout (set to an hour), and a worker started later trains the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import redis

from producer.client import TrainingClient
from producer.keys import ModelKeys
from producer.settings import Settings
from tests.conftest import WorkerFactory
from tests.helpers import (
    Workers,
    check_each_event_once,
    children,
    create_model,
    evidence_env,
    make_events,
    model_state,
    send_from_threads,
    statuses,
    wait_results,
    wait_until,
)
from tests.integration.test_task_events import _Receiver

WAIT = 120.0


def _env(queue: str, visibility: int, **more: str) -> dict[str, str]:
    return {**evidence_env(visibility), "ITRAIN_QUEUE": queue, "ITRAIN_POOL_FETCH": "1", **more}


@contextmanager
def _streaming(client: TrainingClient, events: list[dict[str, Any]], rate: float) -> Iterator[list[Any]]:
    """Streams ``train_step`` events from 4 threads in the background while the block runs; the
    handles, all of them once the block has ended."""
    handles: list[Any] = []
    sender = threading.Thread(target=lambda: handles.extend(send_from_threads(client, events, rate)))
    sender.start()
    try:
        yield handles
    finally:
        sender.join()


def _fetching_worker(
    start_workers: WorkerFactory, redis_url: str, redis_client: redis.Redis, tag: str
) -> tuple[Any, Settings, str, list[dict[str, Any]]]:
    """A worker of two fetching pool processes on a queue of its own (a dead holder's messages
    back after 3 s), a model, 1,500 events for it, and settings that publish to that queue."""
    queue = f"itrain-{tag}-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, queue=queue, history_max=100_000)
    (proc,) = start_workers(1, concurrency=2, env=_env(queue, 3))
    model = create_model(redis_client, settings)
    return proc, settings, model, make_events(model, 1500, f"{tag}-{uuid.uuid4().hex[:6]}")


def _trained_past(redis_client: redis.Redis, model: str, step: int) -> None:
    wait_until(lambda: model_state(redis_client, model)["step"] > step, 60, f"training past step {step}")


def _each_once(
    redis_client: redis.Redis, model: str, events: list[dict[str, Any]], results: list[Any]
) -> None:
    """Every handle answered (trained, or duplicate for a redelivery of a trained event), and
    every event trained exactly once."""
    counts = statuses(results)
    assert counts["trained"] + counts.get("duplicate", 0) == len(events), counts
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in events])
    assert evidence["step"] == len(events)


def _drop_connections_of(redis_client: redis.Redis, pid: int) -> None:
    """Redis drops every connection of the worker ``pid`` and its pool processes (only theirs:
    the test process's own pooled connections outlive this test)."""
    pids = {pid, *children(pid)}
    ours = {
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.net_connections(kind="tcp")
        if c.pid in pids and c.raddr and c.laddr
    }
    for client in redis_client.client_list():
        if client["addr"] in ours:
            with contextlib.suppress(redis.ResponseError):  # gone meanwhile
                redis_client.client_kill(client["addr"])


def _unacked(redis_client: redis.Redis) -> int:
    return int(redis_client.hlen("unacked")) + int(redis_client.zcard("unacked_index"))


def test_pool_processes_fetch_train_and_ack_each_event_once(
    start_workers: WorkerFactory, workers: Workers, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given two workers of two pool processes each, fetching in their pool processes
    queue = f"itrain-pf-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, queue=queue, history_max=100_000)
    procs = start_workers(2, concurrency=2, env=_env(queue, 60, ITRAIN_RECORD_TIMINGS="1"))
    model = create_model(redis_client, settings)
    steps = make_events(model, 800, f"pf-{uuid.uuid4().hex[:6]}")
    many = make_events(model, 600, f"pfm-{uuid.uuid4().hex[:6]}")
    receiver = _Receiver(redis_url)
    try:
        with TrainingClient(settings=settings) as client:
            # When a stream of train_step events comes from 4 threads, with a train_many batch
            # and a predict on the same queue
            handles = client.train_many(many)
            handles += send_from_threads(client, steps, rate=800.0)
            prediction = client.predict(steps[0]).get(timeout=WAIT)
            results = wait_results(client, handles, WAIT, workers)
        # Then every event trained once, and every message was acknowledged
        assert statuses(results) == {"trained": len(steps) + len(many)}, statuses(results)
        evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in steps + many])
        assert evidence["step"] == len(steps) + len(many)
        # And the lock timings of every critical section reached Redis (each batch's ride with a
        # later commit: the last ones are sent when the fetchers go idle)
        timings = ModelKeys(model).prefix + "timings"

        def timed() -> int:  # events of the sections whose timings are in
            return sum(int(row.split()[2]) for row in redis_client.lrange(timings, 0, -1))

        wait_until(lambda: timed() == len(steps) + len(many), 30, "every section's timings")
        wait_until(lambda: _unacked(redis_client) == 0, 30, "every message acknowledged")
        assert prediction["model"] == model
        assert len(prediction["prediction"]) == 1
        # And Flower's receiver saw each train_step task end, under its name
        ids = {h.id for h in handles[len(many) :]}
        wait_until(lambda: ids <= set(receiver.seen), 30, "an end event for every train_step task")
        assert all(receiver.seen[i] == ["task-succeeded"] for i in ids)
        assert {receiver.names[i] for i in ids} == {"itrain.train_step"}
    finally:
        receiver.close()
    # And each pool process fetched (a task the main process had taken would have been seen as
    # received first, above): each worker's log names its two pool processes as fetchers
    for proc in procs:
        log = workers.log(proc)
        assert {int(pid) for pid in _fetcher_pids(log)} == set(workers.pool(proc)), log[-2000:]
        assert "Traceback" not in log, log[-4000:]


def _fetcher_pids(log: str) -> list[str]:
    return [
        line.split("pool process ", 1)[1].split(" ", 1)[0]
        for line in log.splitlines()
        if "fetches queue" in line and "pool process " in line
    ]


def test_a_killed_pool_process_loses_nothing_and_its_replacement_fetches(
    start_workers: WorkerFactory, workers: Workers, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given one worker of two fetching pool processes; dead holders' messages back after 3 s
    proc, settings, model, events = _fetching_worker(start_workers, redis_url, redis_client, "pfk")
    before = set(children(proc.pid))
    with TrainingClient(settings=settings) as client:
        # When one pool process is killed in the middle of a stream
        with _streaming(client, events, rate=500.0) as handles:
            _trained_past(redis_client, model, 200)
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL)
        results = wait_results(client, handles, WAIT, workers)
    # Then every handle is answered, and every event trained exactly once
    _each_once(redis_client, model, events, results)
    # And billiard started another pool process, whose fetcher took part
    wait_until(
        lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid), 30, "a new pool process"
    )
    wait_until(lambda: len(_fetcher_pids(workers.log(proc))) >= 3, 30, "the new pool process's fetcher")
    wait_until(lambda: _unacked(redis_client) == 0, 30, "every message acknowledged")
    workers.assert_alive([proc])


def test_a_warm_shutdown_leaves_nothing_to_the_visibility_timeout(
    start_workers: WorkerFactory, workers: Workers, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a fetching worker whose dead holders' messages would wait an hour
    queue = f"itrain-pfs-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, queue=queue, history_max=100_000)
    env = _env(queue, 3600, ITRAIN_DEDUPE_TTL="30000")
    (first,) = start_workers(1, concurrency=2, env=env)
    model = create_model(redis_client, settings)
    events = make_events(model, 1200, f"pfs-{uuid.uuid4().hex[:6]}")
    with TrainingClient(settings=settings) as client:
        # When it gets a warm shutdown (SIGTERM) in the middle of a stream
        with _streaming(client, events, rate=600.0) as handles:
            _trained_past(redis_client, model, 200)
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 0, workers.tail(first)
            # Then it held nothing when it left
            assert _unacked(redis_client) == 0
        # And a worker started later trains the rest, each event once
        start_workers(1, concurrency=1, env=env)
        results = wait_results(client, handles, WAIT, workers)
    assert statuses(results) == {"trained": len(events)}, statuses(results)
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in events])
    assert evidence["step"] == len(events)
    # And both its fetchers stopped on their own (not killed with their process mid-batch)
    log = workers.log(first)
    assert log.count("stopped fetching queue") == 2, log[-3000:]


def test_lost_connections_and_forgotten_scripts_lose_nothing(
    start_workers: WorkerFactory, workers: Workers, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a fetching worker; a message whose holder is gone comes back after 3 s
    proc, settings, model, events = _fetching_worker(start_workers, redis_url, redis_client, "pff")
    with TrainingClient(settings=settings) as client:
        # When, in the middle of a stream, Redis forgets its scripts (as after a restart) and
        # drops every client's connection, three times
        with _streaming(client, events, rate=500.0) as handles:
            for k in range(3):
                _trained_past(redis_client, model, 300 * (k + 1))
                redis_client.script_flush()
                _drop_connections_of(redis_client, proc.pid)
        results = wait_results(client, handles, WAIT, workers)
    # Then every handle is answered and every event trained exactly once
    _each_once(redis_client, model, events, results)
    wait_until(lambda: _unacked(redis_client) == 0, 30, "every message acknowledged")
    workers.assert_alive([proc])
