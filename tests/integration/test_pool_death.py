"""A pool job that does not finish, in a real worker (``celery -A tests.crash_app worker``, the
production worker whose pool job misbehaves on cue, see ``tests/crash_app.py``).

* A message that kills its pool process: its micro-batch neighbours are each run again alone and
  train exactly once; the culprit, which kills the process again when alone, ends as FAILURE with
  one dead letter and is not retried; the worker lives on and keeps training.
* Redis failing under a job: the messages go back to the queue after a backoff and train once
  Redis answers; nothing is dead-lettered.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.keys import ModelKeys
from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id, result_key
from producer.settings import Settings
from tests.helpers import Workers, check_each_event_once, make_events, wait_until

WAIT = 90.0


@dataclass
class CrashWorker:
    proc: subprocess.Popen[bytes]
    queue: str
    job_log: Path
    workers: Workers
    redis_url: str

    @property
    def settings(self) -> Settings:
        """Settings that publish to this worker's queue."""
        return Settings(redis_url=self.redis_url, queue=self.queue)

    def jobs(self) -> list[list[str]]:
        """The task ids of every pool job run so far, one list per job, in order."""
        if not self.job_log.exists():
            return []
        return [line.split() for line in self.job_log.read_text().splitlines()]

    def tail(self) -> str:
        return self.workers.tail(self.proc)


@pytest.fixture(scope="module")
def crash_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashWorker]:
    logs = tmp_path_factory.mktemp("pool-death")
    queue = f"itrain-crash-{uuid.uuid4().hex[:8]}"
    env = {
        "ITRAIN_REDIS_URL": redis_url,
        "ITRAIN_QUEUE": queue,
        "ITRAIN_TEST_JOB_LOG": str(logs / "jobs.txt"),
        # Messages pushed together wait for each other: one micro-batch, deterministically.
        "ITRAIN_BATCH_WAIT_MS": "300",
    }
    workers = Workers(logs)
    try:
        (proc,) = workers.start(1, redis_url=redis_url, env=env, concurrency=1, app="tests.crash_app")
        yield CrashWorker(proc, queue, logs / "jobs.txt", workers, redis_url)
    finally:
        workers.close()


def _push(client: redis.Redis, queue: str, events: list[dict[str, Any]]) -> list[str]:
    """All events as train_step messages in one LPUSH, so the worker takes them together."""
    ids = [new_task_id() for _ in events]
    client.lpush(
        queue, *[encode_envelope(TASK_TRAIN_STEP, i, [e], queue) for i, e in zip(ids, events, strict=True)]
    )
    return ids


def _results(client: redis.Redis, ids: list[str], worker: CrashWorker) -> list[dict[str, Any]]:
    def all_written() -> list[bytes] | None:
        assert worker.proc.poll() is None, worker.tail()
        raw = client.mget([result_key(i) for i in ids])
        return None if any(r is None for r in raw) else raw

    try:
        raw = wait_until(all_written, WAIT, "every result")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\njobs: {worker.jobs()}\n{worker.tail()}") from None
    return [orjson.loads(r) for r in raw]


def test_message_that_kills_its_pool_process_is_dead_lettered_alone(
    crash_worker: CrashWorker, redis_client: redis.Redis, make_model: Any
) -> None:
    # Given a micro-batch of six valid events and one whose pool job dies
    settings, model = crash_worker.settings, make_model()
    neighbours = make_events(model, 6, f"pd-{uuid.uuid4().hex[:6]}")
    culprit = {**make_events(model, 1, "x")[0], "event_id": f"crash-me-{uuid.uuid4().hex[:6]}"}
    events = [*neighbours[:3], culprit, *neighbours[3:]]

    # When they arrive together
    ids = _push(redis_client, crash_worker.queue, events)
    results = _results(redis_client, ids, crash_worker)

    # Then they were one pool job, and after the death each ran alone exactly once more
    culprit_id = ids[3]
    jobs = crash_worker.jobs()
    first = next(j for j in jobs if culprit_id in j)
    assert sorted(first) == sorted(ids), f"not one micro-batch: {jobs}"
    for task_id in ids:
        runs = [j for j in jobs if task_id in j]
        assert runs == [first, [task_id]], f"{task_id}: {runs}"

    # ... the neighbours trained, each exactly once
    neighbour_results = [r for i, r in zip(ids, results, strict=True) if i != culprit_id]
    assert [r["status"] for r in neighbour_results] == ["SUCCESS"] * 6, neighbour_results
    assert {r["result"]["status"] for r in neighbour_results} == {"trained"}
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in neighbours])
    assert evidence["step"] == 6
    assert culprit["event_id"] not in evidence["markers"]

    # ... the culprit failed, naming the cause, with one dead letter
    failed = results[3]
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "WorkerLostError"
    assert "died" in failed["result"]["exc_message"][0]
    dead = [orjson.loads(d) for d in redis_client.lrange(ModelKeys(model).dead, 0, -1)]
    assert len(dead) == 1, dead
    assert dead[0]["task_id"] == culprit_id
    assert dead[0]["event_id"] == culprit["event_id"]
    assert dead[0]["error"] == "WorkerLostError"

    # ... the messages were all acknowledged, and the worker is alive and still trains
    assert redis_client.llen(crash_worker.queue) == 0
    assert crash_worker.proc.poll() is None
    with TrainingClient(settings=settings) as client:
        (after,) = client.wait_all([client.train_step(make_events(model, 1, "after")[0])], timeout=WAIT)
    assert after["status"] == "trained"
    assert after["step"] == 7


def test_redis_fault_under_a_job_requeues_without_dead_letters(
    crash_worker: CrashWorker, redis_client: redis.Redis, make_model: Any
) -> None:
    # Given a micro-batch whose pool job finds Redis unreachable (the first time only)
    model = make_model()
    events = make_events(model, 4, f"rf-{uuid.uuid4().hex[:6]}")
    events.append({**make_events(model, 1, "y")[0], "event_id": f"redis-fault-{uuid.uuid4().hex[:6]}"})

    # When they arrive together
    ids = _push(redis_client, crash_worker.queue, events)
    results = _results(redis_client, ids, crash_worker)

    # Then all of them went back to the queue once and trained, each exactly once
    assert [r["result"]["status"] for r in results] == ["trained"] * 5, results
    evidence = check_each_event_once(redis_client, model, [e["event_id"] for e in events])
    assert evidence["step"] == 5
    runs = [j for j in crash_worker.jobs() if set(j) & set(ids)]
    assert sorted(runs[0]) == sorted(ids), runs
    assert sum(len(j) for j in runs) == 2 * len(ids), f"not requeued exactly once: {runs}"
    # ... after a backoff, not in a loop, and nothing was dead-lettered
    log = crash_worker.workers.log(crash_worker.proc)
    assert "Redis failed (ConnectionError: injected: Redis unreachable) under 5 message(s)" in log
    assert "requeued in 0.5 s" in log
    assert redis_client.llen(ModelKeys(model).dead) == 0
    assert crash_worker.proc.poll() is None


def test_batch_message_that_kills_its_pool_process_fails_every_event_it_carries(
    crash_worker: CrashWorker, redis_client: redis.Redis, make_model: Any
) -> None:
    # Given a train_many chunk whose pool job dies (one of its events is the trigger)
    settings, model = crash_worker.settings, make_model()
    events = make_events(model, 3, f"pb-{uuid.uuid4().hex[:6]}")
    events[1]["event_id"] = f"crash-me-{uuid.uuid4().hex[:6]}"

    # When it is sent
    with TrainingClient(settings=settings) as client:
        handles = client.train_many(events)
    (chunk,) = _results(redis_client, [handles[0].chunk.id], crash_worker)

    # Then the chunk's one result is a FAILURE naming the cause, which each of its events' handles
    # reads (nothing was trained) ...
    assert chunk["status"] == "FAILURE", chunk
    assert chunk["result"]["exc_type"] == "WorkerLostError"
    with TrainingClient(settings=settings) as reader:
        remade = [reader.handle(h.id) for h in handles]
        assert [h.state for h in remade] == ["FAILURE"] * 3
        results = reader.wait_all(remade, timeout=5)
    assert [type(r).__name__ for r in results] == ["WorkerLostError"] * 3, results
    assert redis_client.hget(ModelKeys(model).ckpt, "step") == b"0"
    # ... with one dead letter for the message, which ran twice (with its events) and no more
    dead = [orjson.loads(d) for d in redis_client.lrange(ModelKeys(model).dead, 0, -1)]
    assert len(dead) == 1, dead
    assert dead[0]["events"] == 3
    runs = [j for j in crash_worker.jobs() if dead[0]["task_id"] in j]
    assert len(runs) == 2, runs
    assert crash_worker.proc.poll() is None
