"""``ITRAIN_MIN_REPLICAS`` on the producer side, against a real master with two real replicas: a
push returns once the replicas hold it (one ``WAIT`` per call, on the pushing connection), a
replica that does not acknowledge makes the call raise ``ReplicationError`` naming the events
(with linger: ``flush()``, ``close()`` and ``wait_all``, the handles staying live), and at 0
nothing waits. Both clients; and the worker's barrier (``worker.store.replicas``)."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from producer import (
    AsyncTrainingClient,
    PermissionDeniedError,
    PublishError,
    ReplicationError,
    TrainingClient,
)
from producer.keys import ModelKeys
from producer.linger import LingerHandle
from producer.protocol import TASK_TRAIN_STEP, result_key
from producer.settings import Settings
from tests.helpers import create_model, make_event, make_events, make_jobs, model_state
from worker.consume import runtime
from worker.consume.faults import is_redis_fault
from worker.consume.messages import RawMessage
from worker.consume.runtime import Runtime, run_messages
from worker.devtools.embedded_redis import ReplicaSet
from worker.devtools.forwarder import Forwarder
from worker.outcome import dead_letter_entry
from worker.store.model_store import Store
from worker.store.replicas import ReplicaBarrier
from worker.store.results import write_results
from worker.training.trainer import Trainer

#: Generous on a shared, busy machine: a healthy replica acknowledges in well under a millisecond.
HEALTHY_MS = 4000
#: The wait when a replica is stopped: every such call takes this long.
SHORT_MS = 200


@pytest.fixture(scope="module")
def replicas() -> Iterator[ReplicaSet]:
    with ReplicaSet(2) as rs:
        yield rs


@pytest.fixture
def paused(replicas: ReplicaSet) -> Iterator[ReplicaSet]:
    """The set with its second replica stopped (SIGSTOP) for the test, in sync again after."""
    replicas.pause(1)
    try:
        yield replicas
    finally:
        replicas.resume(1)
        replicas.wait_synced()


def settings_for(rs: ReplicaSet, min_replicas: int, timeout_ms: int = HEALTHY_MS, **more: Any) -> Settings:
    # A queue of its own per test: no worker runs here, messages stay where they were pushed.
    fields: dict[str, Any] = {
        "redis_url": rs.url,
        "queue": f"q-{uuid.uuid4().hex[:8]}",
        "min_replicas": min_replicas,
        "replica_timeout_ms": timeout_ms,
        "publish_timeout": 10,
    }
    return Settings(**{**fields, **more})


def wait_calls(rs: ReplicaSet) -> int:
    """How many WAIT commands the master has run (``INFO commandstats``)."""
    client = redis.Redis.from_url(rs.url)
    try:
        return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    finally:
        client.close()


def lengths(rs: ReplicaSet, queue: str) -> list[int]:
    """The queue's length on each replica, read at once."""
    out = []
    for replica in rs.replicas:
        client = redis.Redis.from_url(replica.url, socket_timeout=5)
        out.append(int(client.llen(queue)))
        client.close()
    return out


def queued_event_ids(rs: ReplicaSet, queue: str) -> list[str]:
    """The event ids in the messages on the master's queue, oldest first."""
    client = redis.Redis.from_url(rs.url)
    ids: list[str] = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        args = orjson.loads(base64.b64decode(orjson.loads(raw)["body"]))[0]
        # linger's [ids, events]; a chunk's [events]; a train_step's [event]
        events = args[1] if len(args) == 2 else args[0] if isinstance(args[0], list) else args
        ids.extend(e["event_id"] for e in events)
    client.close()
    return ids


# -- the sync client ------------------------------------------------------------------------------


def test_push_returns_once_every_replica_holds_it(replicas: ReplicaSet) -> None:
    # Given a client that wants both replicas
    s = settings_for(replicas, 2, chunk_size=100)
    before = wait_calls(replicas)
    with TrainingClient(settings=s) as client:
        # When one event is pushed
        client.train_step(make_event("m", 0, "one"))
        # Then both replicas hold it as soon as the call returns
        assert lengths(replicas, s.queue) == [1, 1]
        # And a train_many of three chunks, in one LPUSH, waits once
        client.train_many(make_events("m", 250, "many"))
        assert lengths(replicas, s.queue) == [4, 4]
    assert wait_calls(replicas) - before == 2


def test_nothing_waits_at_zero(replicas: ReplicaSet) -> None:
    # Given the default, 0
    s = settings_for(replicas, 0)
    assert Settings(redis_url=replicas.url).min_replicas == 0
    before = wait_calls(replicas)
    # When events are pushed every way
    with TrainingClient(settings=s) as client:
        client.train_step(make_event("m", 0, "z"))
        client.train_many(make_events("m", 10, "zm"))
    with TrainingClient(settings=s, linger_ms=1) as client:
        client.train_step(make_event("m", 0, "zl"))
        client.flush()
    # Then no WAIT was sent
    assert wait_calls(replicas) == before


def test_train_step_and_train_many_raise_when_a_replica_is_missing(paused: ReplicaSet) -> None:
    # Given a client that wants both replicas, one of which acknowledges nothing
    s = settings_for(paused, 2, SHORT_MS)
    with TrainingClient(settings=s) as client:
        # When one event is pushed
        with pytest.raises(ReplicationError) as step:
            client.train_step(make_event("m", 0, "rs"))
        # Then the error names the counts and the event, and it is a PublishError
        assert isinstance(step.value, PublishError)
        assert (step.value.wanted, step.value.got, step.value.event_ids) == (2, 1, ["rs-0"])
        assert "1 of the 2 replica(s)" in str(step.value)
        # When many events without ids are pushed (the client makes their ids)
        events = [{k: v for k, v in e.items() if k != "event_id"} for e in make_events("m", 300, "x")]
        with pytest.raises(ReplicationError) as many:
            client.train_many(events)
        # Then the error carries the ids the messages carry, every one of them
        assert many.value.event_ids == queued_event_ids(paused, s.queue)[1:]
        assert len(set(many.value.event_ids)) == 300
    # And one replica is enough for a client that wants one
    with TrainingClient(settings=settings_for(paused, 1, HEALTHY_MS)) as client:
        client.train_step(make_event("m", 1, "rs"))


def test_linger_reports_from_flush_close_and_wait_all(paused: ReplicaSet) -> None:
    # Given a lingering client that wants both replicas, one of which acknowledges nothing
    s = settings_for(paused, 2, SHORT_MS)
    client = TrainingClient(settings=s, linger_ms=2)
    try:
        handles = [client.train_step(make_event("m", i, "lf")) for i in range(5)]
        # When the buffer is flushed
        with pytest.raises(ReplicationError) as flushed:
            client.flush()
        # Then the error names every event, once reported it is not raised again
        assert sorted(flushed.value.event_ids) == [f"lf-{i}" for i in range(5)]
        client.flush()
        # And the handles stay live: the messages are in Redis, on the master
        assert all(isinstance(h, LingerHandle) and h.send_error is None for h in handles)
        assert {h.state for h in handles} == {"PENDING"}
        assert queued_event_ids(paused, s.queue) == [f"lf-{i}" for i in range(5)]
        # When other events are waited on
        more = [client.train_step(make_event("m", i, "lw")) for i in range(3)]
        with pytest.raises(ReplicationError) as waited:
            client.wait_all(more, timeout=1)
        assert sorted(waited.value.event_ids) == [f"lw-{i}" for i in range(3)]
        # When the client closes with events of its own still unreported
        client.train_step(make_event("m", 0, "lc"))
    finally:
        with pytest.raises(ReplicationError) as closed:
            client.close()
    assert closed.value.event_ids == ["lc-0"]


# -- the asyncio client ---------------------------------------------------------------------------


def test_async_client_waits_and_raises_the_same(replicas: ReplicaSet) -> None:
    s = settings_for(replicas, 2, chunk_size=100)
    short = s.model_copy(update={"replica_timeout_ms": SHORT_MS})
    before = wait_calls(replicas)

    async def healthy() -> None:
        async with AsyncTrainingClient(settings=s) as client:
            await client.train_step(make_event("m", 0, "a1"))
            assert lengths(replicas, s.queue) == [1, 1]
            await client.train_many(make_events("m", 250, "am"))
            assert lengths(replicas, s.queue) == [4, 4]
        async with AsyncTrainingClient(settings=s.model_copy(update={"min_replicas": 0})) as client:
            await client.train_step(make_event("m", 1, "a0"))
            await client.train_many(make_events("m", 10, "a0m"))

    asyncio.run(healthy())
    assert wait_calls(replicas) - before == 2  # one per call at 2, none at 0

    async def missing() -> tuple[list[ReplicationError], list[Any]]:
        errors: list[ReplicationError] = []
        async with AsyncTrainingClient(settings=short) as client:
            for call in (
                client.train_step(make_event("m", 0, "as")),
                client.train_many(make_events("m", 3, "asm")),
            ):
                try:
                    await call
                except ReplicationError as exc:
                    errors.append(exc)
        lingering = AsyncTrainingClient(settings=short, linger_ms=2)
        handles = [await lingering.train_step(make_event("m", i, "al")) for i in range(4)]
        try:
            await lingering.flush()
        except ReplicationError as exc:
            errors.append(exc)
        more = [await lingering.train_step(make_event("m", i, "alw")) for i in range(2)]
        try:
            await lingering.wait_all(more, timeout=1)
        except ReplicationError as exc:
            errors.append(exc)
        await lingering.train_step(make_event("m", 0, "alc"))
        try:
            await lingering.aclose()
        except ReplicationError as exc:
            errors.append(exc)
        return errors, handles

    replicas.pause(1)
    try:
        errors, handles = asyncio.run(missing())
    finally:
        replicas.resume(1)
        replicas.wait_synced()
    assert [sorted(e.event_ids) for e in errors] == [
        ["as-0"],
        ["asm-0", "asm-1", "asm-2"],
        [f"al-{i}" for i in range(4)],
        ["alw-0", "alw-1"],
        ["alc-0"],
    ]
    assert {(e.wanted, e.got) for e in errors} == {(2, 1)}
    assert {h.state for h in handles} == {"PENDING"}  # live


def test_a_user_without_wait_is_told_the_events_were_enqueued(replicas: ReplicaSet) -> None:
    # Given a user who may push but not WAIT (an ACL older than ITRAIN_MIN_REPLICAS)
    admin = redis.Redis.from_url(replicas.url)
    admin.execute_command("ACL", "SETUSER", "nowait", "reset", "on", ">pw", "~*", "&*", "+@all", "-wait")
    s = settings_for(replicas, 1, redis_url=replicas.url.replace("redis://", "redis://nowait:pw@"))
    try:
        # When an event is pushed, by either client
        with TrainingClient(settings=s) as client, pytest.raises(PermissionDeniedError) as sync:
            client.train_step(make_event("m", 0, "nw"))

        async def push() -> None:
            async with AsyncTrainingClient(settings=s) as client:
                await client.train_step(make_event("m", 1, "nw"))

        with pytest.raises(PermissionDeniedError) as asynchronous:
            asyncio.run(push())
    finally:
        admin.execute_command("ACL", "DELUSER", "nowait")
    # Then the error says what is true: the events were enqueued, their replicas are unknown
    for error in (sync.value, asynchronous.value):
        assert "were enqueued, but their replicas cannot be waited for" in str(error)
    assert queued_event_ids(replicas, s.queue) == ["nw-0", "nw-1"]
    admin.close()


# -- the worker's barrier -------------------------------------------------------------------------


def test_worker_barrier_wherever_replicas_are_wanted(replicas: ReplicaSet) -> None:
    client = redis.Redis.from_url(replicas.url)
    s = Settings(redis_url=replicas.url, min_replicas=1)
    # The broker's own Redis waits too: in a failover the ack can reach another server than the
    # commit did (worker.store.replicas)
    assert ReplicaBarrier.of(client, s, s.store) is not None
    other = s.model_copy(update={"store_url": replicas.url.replace("/0", "/1")})
    assert ReplicaBarrier.of(client, other, other.store) is not None
    # Nothing wanted: nothing waits
    assert ReplicaBarrier.of(client, other.model_copy(update={"min_replicas": 0}), other.store) is None
    assert ReplicaBarrier.of(client, s.model_copy(update={"min_replicas": 0}), s.store) is None
    client.close()


def test_worker_barrier_covers_writes_of_other_connections(paused: ReplicaSet) -> None:
    # Given a write made on another connection while a replica acknowledges nothing
    s = Settings(redis_url="redis://broker.invalid:6379/0", store_url=paused.url, min_replicas=2)
    writer, waiter = redis.Redis.from_url(paused.url), redis.Redis.from_url(paused.url)
    waiter.ping()  # (a connection of its own, opened before the write)
    writer.set("itrain:test:barrier", "1")
    barrier = ReplicaBarrier.of(waiter, s.model_copy(update={"replica_timeout_ms": SHORT_MS}), s.store)
    assert barrier is not None
    # When the worker crosses the barrier on its own connection
    with pytest.raises(ReplicationError) as short:
        barrier.cross(["e1"], "commit")
    # Then it waited for that write too, and fell short
    assert (short.value.wanted, short.value.got, short.value.event_ids) == (2, 1, ["e1"])
    assert is_redis_fault(short.value)  # the worker puts its messages back
    writer.close()
    waiter.close()


def test_a_commit_and_its_results_wait_for_the_replicas_in_their_own_round_trips(
    replicas: ReplicaSet,
) -> None:
    # Given a worker's store and results on the broker's own Redis (one URL), wanting both
    # replicas, reached through a forwarder that counts round trips
    s = settings_for(replicas, 2)
    with Forwarder(replicas.master.port, delay_ms=1) as fwd:
        client = redis.Redis(port=fwd.port, socket_timeout=10)
        barrier = ReplicaBarrier.of(client, s, s.store)
        assert barrier is not None
        # (a worker's trainer: its lock timings go in front of the results)
        trainer = Trainer(Store(client, s, barrier=barrier), s, defer_timings=True)
        model = create_model(client, s)
        # (its checkpoint cached, the results' script loaded)
        write_results(client, trainer.train(make_jobs(model, "a", 10)), 60, before=trainer.queue_timings)
        # When it trains a batch and writes its results
        before = fwd.stats()["round_trips"]
        outcomes = trainer.train(make_jobs(model, "b", 10))
        trained = fwd.stats()["round_trips"] - before
        write_results(client, outcomes, 60, before=trainer.queue_timings, barrier=barrier, event_ids=["b"])
        # Then each wait rode in the round trip of what it waits for: lock + read, commit +
        # release + wait, results + wait (there is no round trip of its own to lose its way)
        assert (trained, fwd.stats()["round_trips"] - before - trained) == (2, 1)
        assert model_state(client, model)["step"] == 20
        # And when a replica stops acknowledging, the next commit lands but raises: a Redis fault,
        # so the worker does not ack its messages (they come back as duplicates of the markers)
        replicas.pause(1)
        try:
            short = s.model_copy(update={"replica_timeout_ms": SHORT_MS})
            barrier.wait = ReplicaBarrier.of(client, short, s.store).wait  # type: ignore[union-attr]
            with pytest.raises(ReplicationError) as error:
                trainer.train(make_jobs(model, "c", 10))
            assert "the commit of 10 event(s)" in str(error.value)
            assert model_state(client, model)["step"] == 30
            assert not client.exists(ModelKeys(model).lock)  # (given back in the commit's trip)
            with pytest.raises(ReplicationError) as results:
                write_results(client, outcomes, 60, barrier=barrier, event_ids=["r1", "r2"])
            assert results.value.event_ids == ["r1", "r2"]
            # (and a dead letter: written, then the shortfall raised)
            entry = dead_letter_entry("t1", ValueError("bad"), model=model, event_id="e1")
            with pytest.raises(ReplicationError):
                trainer.store.dead_letter(model, [entry])
            assert client.llen(ModelKeys(model).dead) == 1
        finally:
            replicas.resume(1)
            replicas.wait_synced()
        client.close()


def test_a_worker_waiting_for_replicas_writes_results_only_after_the_commits_wait(
    replicas: ReplicaSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's results ride in its commit's round trip only where nothing waits between them: with
    ``ITRAIN_MIN_REPLICAS`` a caller must never read ``trained`` of a commit the replicas do not
    hold yet (a failover would take it back)."""
    # Given a worker process wanting both replicas, that has trained (its scripts loaded)
    s = settings_for(replicas, 2, SHORT_MS)
    rt = Runtime(s)
    monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
    model = create_model(rt.store_client, s)

    def message(i: int) -> RawMessage:
        body = orjson.dumps([[make_event(model, i)], {}, {}])
        return RawMessage(TASK_TRAIN_STEP, str(uuid.uuid4()), "application/json", "utf-8", None, body)

    first = message(0)
    run_messages([first], results_with_commit=True)
    assert rt.store_client.exists(result_key(first.task_id))
    # When one replica stops acknowledging and it trains the next message, its results asked to
    # ride with the commit
    late = message(1)
    replicas.pause(1)
    try:
        with pytest.raises(ReplicationError, match="the commit of 1 event"):
            run_messages([late], results_with_commit=True)
        # Then the commit landed (the redelivery will find its marker), and no result was written
        assert model_state(rt.store_client, model)["step"] == 2
        assert not rt.store_client.exists(result_key(late.task_id))
    finally:
        replicas.resume(1)
        replicas.wait_synced()
