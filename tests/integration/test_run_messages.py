"""``run_messages`` in this process against a real Redis: poison isolation, Redis faults, the
delivery limit, and the precedence of results (``worker/store/lua/write_results.lua``).

Messages are built by hand as the broker hands them over (``RawMessage``), so every hostile shape
reaches the pool-process code exactly as it would in a worker.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis

from producer.celery_config import make_celery
from producer.errors import DeliveryExpiredError, DeliveryLimitError, EventProcessingError, InvalidEventError
from producer.keys import UNROUTED_DEAD, ModelKeys
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, result_key
from producer.settings import Settings
from tests.helpers import raw_event
from worker.consume import runtime
from worker.consume.faults import is_redis_fault
from worker.consume.messages import RawMessage
from worker.consume.runtime import Runtime, run_messages
from worker.devtools.embedded_redis import RedisServer
from worker.engine.batch import Job
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.engine.mlp import init_params
from worker.store.model_store import Store
from worker.store.results import Outcome, write_results
from worker.training.trainer import ResultsAlong, Trainer

BAD_TIMESTAMP = "0001-01-01T00:00:00+01:00"


# -- building messages -----------------------------------------------------------------------------


def body_of(args: list[Any]) -> bytes:
    return orjson.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])


def step_message(task_id: str, ev: Any, deliveries: int = 1) -> RawMessage:
    return RawMessage(TASK_TRAIN_STEP, task_id, "application/json", "utf-8", None, body_of([ev]), deliveries)


def batch_message(
    ids: list[Any], events: list[Any], deliveries: int = 1, body: bytes | None = None
) -> RawMessage:
    raw = body if body is not None else body_of([ids, events])
    return RawMessage(
        TASK_TRAIN_BATCH, f"chunk-{uuid.uuid4()}", "application/json", "utf-8", None, raw, deliveries
    )


def new_id() -> str:
    return str(uuid.uuid4())


# -- reading what happened -------------------------------------------------------------------------


def meta(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    raw = client.get(result_key(task_id))
    return None if raw is None else orjson.loads(raw)


def dead_letters(client: redis.Redis, model: str) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in client.lrange(ModelKeys(model).dead, 0, -1)]


def step(client: redis.Redis, model: str) -> int:
    return int(client.hget(ModelKeys(model).ckpt, "step"))


def result_keys(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match="celery-task-meta-*", count=1000))


@pytest.fixture
def app(redis_url: str) -> Iterator[Any]:
    """A Celery app on the private Redis, to read results as a caller does (``AsyncResult.get``)."""
    celery_app = make_celery(Settings(redis_url=redis_url), main="itrain-test-results")
    yield celery_app
    celery_app.close()


@pytest.fixture
def own_runtime(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """The runtime ``run_messages`` uses, made fresh on the private Redis for this test."""
    rt = Runtime(Settings(redis_url=redis_url))
    monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
    return rt


# -- poison isolation ----------------------------------------------------------------------------


def test_bad_timestamp_second_in_chunk_fails_alone_and_first_trains(
    own_runtime, make_model, redis_client, app
) -> None:
    # Given a chunk whose second event has a date that is before year 1 in UTC
    model = make_model()
    ids = [new_id(), new_id()]
    msg = batch_message(ids, [raw_event(model, "good"), raw_event(model, "bad", timestamp=BAD_TIMESTAMP)])
    # When the pool-process code runs it
    (summary,) = run_messages([msg])
    # Then the message succeeds with counts, the first event trains, the second fails naming timestamp
    assert summary[1] == "SUCCESS"
    assert summary[2] == {"events": 2, "trained": 1, "failed": 1}
    assert app.AsyncResult(ids[0]).get(timeout=5)["status"] == "trained"
    with pytest.raises(InvalidEventError, match="timestamp"):
        app.AsyncResult(ids[1]).get(timeout=5)
    # And it has one dead letter, and the weights hold one event
    dead = dead_letters(redis_client, model)
    assert [(d["task_id"], d["event_id"], d["error"]) for d in dead] == [(ids[1], "bad", "InvalidEventError")]
    assert "out of range" in dead[0]["reason"]
    assert step(redis_client, model) == 1


def test_context_integer_beyond_64_bits_fails_alone(own_runtime, make_model, redis_client, app) -> None:
    # Given a train_step message whose context holds 2**63 (one past the 64-bit range), and a good one
    model = make_model()
    bad_id, good_id = new_id(), new_id()
    messages = [
        step_message(bad_id, raw_event(model, "big", context={"n": 2**63})),
        step_message(good_id, raw_event(model, "fine", context={"n": 2**63 - 1})),
    ]
    # When both run together
    summaries = run_messages(messages)
    # Then the first fails naming context.n and the 64-bit rule, and the second trains
    assert [s[1] for s in summaries] == ["FAILURE", "SUCCESS"]
    assert "context.n" in summaries[0][2]
    assert "64 bits" in summaries[0][2]
    with pytest.raises(InvalidEventError, match=r"context\.n"):
        app.AsyncResult(bad_id).get(timeout=5)
    assert app.AsyncResult(good_id).get(timeout=5)["status"] == "trained"
    assert [d["event_id"] for d in dead_letters(redis_client, model)] == ["big"]


def test_surrogate_task_id_in_header_is_refused_without_a_result(
    own_runtime, make_model, redis_client
) -> None:
    # Given a train_step message whose header id came from the JSON escape "\ud800"
    model = make_model()
    before = result_keys(redis_client)
    msg = step_message("\ud800", raw_event(model, "orphan"))
    # When it runs
    (summary,) = run_messages([msg])
    # Then it fails naming the task id, nothing is trained, no result is written anywhere
    assert summary[1] == "FAILURE"
    assert "task id is not valid text" in summary[2]
    assert step(redis_client, model) == 0
    assert result_keys(redis_client) == before
    # And its event has a dead letter in its model's list, the id escaped so JSON can hold it
    (dead,) = dead_letters(redis_client, model)
    assert (dead["task_id"], dead["event_id"]) == ("\\ud800", "orphan")


def test_surrogate_id_in_batch_list_fails_alone(own_runtime, make_model, redis_client, app) -> None:
    # Given a chunk whose second result id is a lone surrogate escape in the JSON body
    model = make_model()
    good = new_id()
    events = [raw_event(model, "e-good"), raw_event(model, "e-orphan")]
    body = body_of([[good, "@SURROGATE@"], events]).replace(b'"@SURROGATE@"', b'"\\ud800"')
    # When it runs
    (summary,) = run_messages([batch_message([], [], body=body)])
    # Then the first event trains; the second has no id to answer under: a dead letter, no result
    assert summary[1] == "SUCCESS"
    assert summary[2] == {"events": 2, "trained": 1, "failed": 1}
    assert app.AsyncResult(good).get(timeout=5)["status"] == "trained"
    (dead,) = dead_letters(redis_client, model)
    assert (dead["task_id"], dead["event_id"]) == ("\\ud800", "e-orphan")
    assert "not valid text" in dead["reason"]
    assert step(redis_client, model) == 1


def test_junk_body_fails_its_message_and_the_next_message_trains(
    own_runtime, make_model, redis_client, app
) -> None:
    # Given a message whose body is not JSON, followed by a valid one
    model = make_model()
    junk_id, good_id = new_id(), new_id()
    junk = RawMessage(TASK_TRAIN_STEP, junk_id, "application/json", "utf-8", None, b"\x00not json{")
    before = redis_client.llen(UNROUTED_DEAD) + redis_client.llen(ModelKeys("default").dead)
    # When both run together
    summaries = run_messages([junk, step_message(good_id, raw_event(model, "after-junk"))])
    # Then the junk message fails under its id with a dead letter, and the valid one trains
    assert [s[1] for s in summaries] == ["FAILURE", "SUCCESS"]
    with pytest.raises(InvalidEventError, match="not valid JSON"):
        app.AsyncResult(junk_id).get(timeout=5)
    assert app.AsyncResult(good_id).get(timeout=5)["status"] == "trained"
    after = redis_client.llen(UNROUTED_DEAD) + redis_client.llen(ModelKeys("default").dead)
    assert after == before + 1


def test_ignore_result_trains_and_dead_letters_but_writes_no_result(
    own_runtime, make_model, redis_client, app
) -> None:
    # Given messages sent with Celery's ignore_result: a train_step, a chunk with a poison event,
    # a message that does not decode; and one ordinary train_step beside them
    model = make_model()
    step_id, good_id, bad_id, junk_id, plain_id = (new_id() for _ in range(5))
    silent = [
        replace(step_message(step_id, raw_event(model, "s1")), ignore_result=True),
        replace(
            batch_message(
                [good_id, bad_id],
                [raw_event(model, "s2"), raw_event(model, "s3", timestamp=BAD_TIMESTAMP)],
            ),
            ignore_result=True,
        ),
        RawMessage(TASK_TRAIN_STEP, junk_id, "application/json", "utf-8", None, b"junk", ignore_result=True),
    ]
    # When they run together
    summaries = run_messages([*silent, step_message(plain_id, raw_event(model, "s4"))])
    # Then the valid events train, each failure is dead-lettered, the summaries (task events)
    # still tell each message's story
    assert step(redis_client, model) == 3
    assert [s[1] for s in summaries] == ["SUCCESS", "SUCCESS", "FAILURE", "SUCCESS"]
    assert summaries[1][2] == {"events": 2, "trained": 1, "failed": 1}
    assert [d["event_id"] for d in dead_letters(redis_client, model)] == ["s3"]
    # and only the ordinary message has a result
    for task_id in (step_id, good_id, bad_id, junk_id):
        assert meta(redis_client, task_id) is None, task_id
    assert app.AsyncResult(plain_id).get(timeout=5)["status"] == "trained"


def test_error_raised_while_training_one_event_fails_only_that_event(
    own_runtime, make_model, redis_client, app
) -> None:
    # Given a trainer that raises an unexpected error (as a library limit would) for one event
    model = make_model()

    class Tripwire(Trainer):
        def train(self, jobs: Sequence[Job], *, results: int | ResultsAlong | None = None) -> list[Outcome]:
            if any(j.event.event_id == "poison" for j in jobs):
                raise OverflowError("synthetic overflow")
            return super().train(jobs, results=results)

    own_runtime.trainer = Tripwire(own_runtime.store, own_runtime.settings)
    ids = [new_id() for _ in range(7)]
    names = ["a", "b", "c", "poison", "d", "e", "f"]
    # When a chunk holding it runs
    (summary,) = run_messages([batch_message(ids, [raw_event(model, n) for n in names])])
    # Then its six neighbours train, each once, and only it fails, with a dead letter
    assert summary[2] == {"events": 7, "trained": 6, "failed": 1}
    assert step(redis_client, model) == 6
    for task_id, name in zip(ids, names, strict=True):
        if name == "poison":
            with pytest.raises(EventProcessingError, match="OverflowError"):
                app.AsyncResult(task_id).get(timeout=5)
        else:
            assert app.AsyncResult(task_id).get(timeout=5)["status"] == "trained"
    assert [d["event_id"] for d in dead_letters(redis_client, model)] == ["poison"]


# -- Redis faults are not the message's fault ------------------------------------------------------


def _model_on(url: str) -> str:
    client = redis.Redis.from_url(url)
    settings = Settings(redis_url=url)
    cfg = ModelConfig()
    name = f"m-{uuid.uuid4().hex[:12]}"
    Store(client, settings).create(name, Checkpoint(cfg, init_params(cfg.shape, cfg.seed), 0, 0), force=False)
    client.close()
    return name


def test_stopped_redis_propagates_and_writes_nothing(monkeypatch) -> None:
    # Given a runtime whose Redis has stopped
    with RedisServer() as server:
        model = _model_on(server.url)
        rt = Runtime(Settings(redis_url=server.url, publish_timeout=1.0))
        monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
        server.stop()
        # When a valid message and a junk one run
        messages = [
            step_message(new_id(), raw_event(model, "e1")),
            RawMessage(TASK_TRAIN_STEP, new_id(), "application/json", "utf-8", None, b"junk"),
        ]
        # Then the Redis error comes out (the main process requeues both): nothing is answered
        with pytest.raises(redis.ConnectionError) as info:
            run_messages(messages)
        assert is_redis_fault(info.value)


def test_out_of_memory_propagates_and_nothing_is_answered(monkeypatch) -> None:
    # Given a Redis that refuses writes (maxmemory reached, noeviction), and a model in it
    with RedisServer(extra=["--maxmemory-policy", "noeviction"]) as server:
        model = _model_on(server.url)
        client = redis.Redis.from_url(server.url)
        rt = Runtime(Settings(redis_url=server.url))
        monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
        client.config_set("maxmemory", "1")
        ids = [new_id(), new_id()]
        messages = [
            step_message(ids[0], raw_event(model, "e1")),
            RawMessage(TASK_TRAIN_STEP, ids[1], "application/json", "utf-8", None, b"junk"),
        ]
        # When they run
        with pytest.raises(redis.exceptions.OutOfMemoryError) as info:
            run_messages(messages)
        assert is_redis_fault(info.value)
        # Then neither was answered nor dead-lettered: they go back to the queue whole
        client.config_set("maxmemory", "0")
        assert client.mget([result_key(i) for i in ids]) == [None, None]
        assert client.llen(ModelKeys(model).dead) == 0
        assert client.llen(UNROUTED_DEAD) == 0
        assert step(client, model) == 0
        # And once Redis has room again, the same messages are answered
        assert [s[1] for s in run_messages(messages)] == ["SUCCESS", "FAILURE"]
        client.close()


def test_busy_redis_propagates(monkeypatch) -> None:
    # Given a Redis busy running a long script (BUSY replies after 50 ms)
    with RedisServer(extra=["--busy-reply-threshold", "50"]) as server:
        model = _model_on(server.url)
        rt = Runtime(Settings(redis_url=server.url))
        monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
        spinner = redis.Redis.from_url(server.url)
        spin = "local t0 = redis.call('TIME')[1] while redis.call('TIME')[1] - t0 < 2 do end return 1"
        thread = threading.Thread(target=spinner.eval, args=(spin, 0), daemon=True)
        thread.start()
        time.sleep(0.3)
        # When a message runs meanwhile
        with pytest.raises(redis.ResponseError) as info:
            run_messages([step_message(new_id(), raw_event(model, "e1"))])
        thread.join(10)
        spinner.close()
        # Then the BUSY error came out, and it counts as Redis's fault
        assert str(info.value).startswith("BUSY")
        assert is_redis_fault(info.value)


# -- the delivery limit --------------------------------------------------------------------------


def test_message_delivered_too_often_is_not_trained(own_runtime, make_model, redis_client, app) -> None:
    # Given an event already trained, and ITRAIN_MAX_DELIVERIES at its default of 5
    assert own_runtime.settings.max_deliveries == 5
    model = make_model()
    run_messages([step_message(new_id(), raw_event(model, "trained-before"))])
    assert step(redis_client, model) == 1
    # When a chunk holding it and a new event comes for the 6th time
    ids = [new_id(), new_id()]
    (summary,) = run_messages(
        [batch_message(ids, [raw_event(model, "trained-before"), raw_event(model, "never")], deliveries=6)]
    )
    # Then nothing is trained: the trained one answers duplicate, the other fails naming the limit
    assert summary[2] == {"events": 2, "duplicate": 1, "failed": 1}
    assert step(redis_client, model) == 1
    assert app.AsyncResult(ids[0]).get(timeout=5)["status"] == "duplicate"
    with pytest.raises(DeliveryLimitError, match=r"delivered 6 times.*ITRAIN_MAX_DELIVERIES=5"):
        app.AsyncResult(ids[1]).get(timeout=5)
    assert [(d["event_id"], d["error"]) for d in dead_letters(redis_client, model)] == [
        ("never", "DeliveryLimitError")
    ]


def test_message_at_the_delivery_limit_still_trains(own_runtime, make_model, redis_client) -> None:
    # Given a message on its 5th delivery (the limit itself)
    model = make_model()
    (summary,) = run_messages([step_message(new_id(), raw_event(model, "fifth"), deliveries=5)])
    # Then it trains
    assert summary[2]["status"] == "trained"
    assert step(redis_client, model) == 1


def test_message_older_than_the_marker_window_is_answered_expired(
    redis_url, make_model, redis_client, app, monkeypatch
) -> None:
    # Given markers kept 40 s and deliveries that may run 10 s: a message is trained until 30 s
    # after it was first taken
    rt = Runtime(Settings(redis_url=redis_url, dedupe_ttl=40, visibility_timeout=10, max_deliveries=3))
    monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
    model = make_model()
    run_messages([step_message(new_id(), raw_event(model, "trained-before"))])
    now = time.time()
    # When a chunk first taken 31 s ago comes back (on its first counted delivery), with one
    # event in the weights and one not, beside a message taken 29 s ago
    ids = [new_id(), new_id()]
    old = batch_message(ids, [raw_event(model, "trained-before"), raw_event(model, "too-late")])
    fresh_id = new_id()
    fresh = step_message(fresh_id, raw_event(model, "just-in-time"))
    summaries = run_messages([replace(old, first_taken=now - 31), replace(fresh, first_taken=now - 29)])
    # Then the old one trains nothing: duplicate for the trained event, FAILURE naming its age
    # and the window for the other, with its dead letter; the younger one trains
    assert summaries[0][2] == {"events": 2, "duplicate": 1, "failed": 1}
    assert summaries[1][2]["status"] == "trained"
    assert step(redis_client, model) == 2
    assert app.AsyncResult(ids[0]).get(timeout=5)["status"] == "duplicate"
    with pytest.raises(DeliveryExpiredError, match=r"first taken 3\d s ago.*40 - 10 = 30 s"):
        app.AsyncResult(ids[1]).get(timeout=5)
    assert [(d["event_id"], d["error"]) for d in dead_letters(redis_client, model)] == [
        ("too-late", "DeliveryExpiredError")
    ]


# -- results nobody can steal ----------------------------------------------------------------------


def test_forged_chunk_naming_a_trained_id_leaves_its_result(
    own_runtime, make_model, redis_client, app
) -> None:
    # Given a job whose event trained
    model = make_model()
    victim = new_id()
    run_messages([step_message(victim, raw_event(model, "real"))])
    original = redis_client.get(result_key(victim))
    # When forged chunks name its id: one with a junk event, one with another valid event
    run_messages([batch_message([victim], [{"junk": True}])])
    run_messages([batch_message([victim], [raw_event(model, "forged")])])
    # Then its result is the original one, byte for byte
    assert redis_client.get(result_key(victim)) == original
    result = app.AsyncResult(victim).get(timeout=5)
    assert (result["status"], result["event_id"]) == ("trained", "real")


def test_lock_timeout_failure_then_redelivery_that_trains_says_trained(
    own_runtime, make_model, redis_client, app
) -> None:
    # Given a job that ended as FAILURE for its event (a lock_timeout, say) before its message was acked
    model = make_model()
    task_id = new_id()
    failed = Outcome.failure(task_id, RuntimeError("lock_timeout"), event_id="late-train")
    write_results(redis_client, [failed], 60)
    # When the redelivered message trains the event
    (summary,) = run_messages([step_message(task_id, raw_event(model, "late-train"), deliveries=2)])
    # Then the result says trained
    assert summary[2]["status"] == "trained"
    assert app.AsyncResult(task_id).get(timeout=5)["status"] == "trained"


def _trained(task_id: str, event_id: str, step_no: int = 1) -> Outcome:
    return Outcome.success(
        task_id,
        {"status": "trained", "model": "m", "event_id": event_id, "step": step_no, "version": 2, "loss": 0.5},
    )


def _skipped(task_id: str, event_id: str) -> Outcome:
    return Outcome.success(task_id, {"status": "skipped", "model": "m", "event_id": event_id, "reason": "r"})


def _failure(task_id: str, event_id: str | None, why: str = "lock_timeout") -> Outcome:
    return Outcome.failure(task_id, RuntimeError(why), event_id=event_id)


PRECEDENCE = [
    # (first, second, which one stands)
    ("failure", "trained", "second"),
    ("failure-no-event", "trained", "second"),
    ("skipped", "trained", "second"),
    ("duplicate", "trained", "second"),
    ("trained", "failure", "first"),
    ("trained", "duplicate", "first"),
    ("trained", "skipped", "first"),
    ("trained", "trained-again", "first"),
    ("duplicate", "duplicate-again", "first"),
    ("failure", "failure-again", "first"),
    ("failure", "duplicate", "first"),
    ("duplicate", "failure", "first"),
    ("failure", "trained-other-event", "first"),
    ("trained", "trained-other-event", "first"),
    ("duplicate", "trained-other-event", "first"),
]


def _outcome(kind: str, task_id: str) -> Outcome:
    return {
        "trained": lambda: _trained(task_id, "E"),
        "trained-again": lambda: _trained(task_id, "E", step_no=9),
        "trained-other-event": lambda: _trained(task_id, "F"),
        "failure": lambda: _failure(task_id, "E"),
        "failure-again": lambda: _failure(task_id, "E", why="non-finite"),
        "failure-no-event": lambda: _failure(task_id, None),
        "skipped": lambda: _skipped(task_id, "E"),
        "duplicate": lambda: Outcome.duplicate(task_id, "m", "E"),
        "duplicate-again": lambda: Outcome.duplicate(task_id, "m2", "E"),
    }[kind]()


@pytest.mark.parametrize(
    ("first", "second", "stands"), PRECEDENCE, ids=[f"{a}-then-{b}" for a, b, _ in PRECEDENCE]
)
def test_result_precedence(redis_client, first, second, stands) -> None:
    # Given a result written for a task id
    task_id = new_id()
    a, b = _outcome(first, task_id), _outcome(second, task_id)
    assert write_results(redis_client, [a], 60) == 1
    # When a second result for the same id comes
    written = write_results(redis_client, [b], 60)
    # Then the rule decides which one stands, whole
    winner = a if stands == "first" else b
    stored = meta(redis_client, task_id)
    assert stored is not None
    named = stored["event_id"] if stored["status"] == "FAILURE" else stored["result"].get("event_id")
    assert (stored["status"], stored["result"], named) == (winner.status, winner.result, winner.event_id)
    assert written == (1 if stands == "second" else 0)
    assert 0 < redis_client.ttl(result_key(task_id)) <= 60


def test_result_records_its_event_and_celery_reads_it(redis_client, app) -> None:
    # Given results written for a trained event and a failed one
    ok, bad = new_id(), new_id()
    write_results(redis_client, [_trained(ok, "E1"), _failure(bad, "E2")], 60)
    # Then the stored meta names each event (a SUCCESS in its result, a FAILURE beside it), and
    # AsyncResult reads both as Celery's own
    assert meta(redis_client, ok)["result"]["event_id"] == "E1"
    assert meta(redis_client, bad)["event_id"] == "E2"
    handle = app.AsyncResult(ok)
    assert (handle.state, handle.ready()) == ("SUCCESS", True)
    assert handle.get(timeout=5) == _trained(ok, "E1").result
    assert app.AsyncResult(bad).state == "FAILURE"
    with pytest.raises(RuntimeError, match="lock_timeout"):
        app.AsyncResult(bad).get(timeout=5)


def test_a_write_publishes_and_a_refused_one_does_not(redis_client) -> None:
    # Given a subscriber on a result's channel (how a waiting AsyncResult.get() wakes)
    task_id = new_id()
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(result_key(task_id))
    try:
        # When a result is written, then a refused one, then one that replaces it
        write_results(redis_client, [_failure(task_id, "E")], 60)
        write_results(redis_client, [_failure(task_id, "E", why="other")], 60)
        write_results(redis_client, [_trained(task_id, "E")], 60)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.5)
            if msg:
                got.append(orjson.loads(msg["data"]))
        time.sleep(0.2)
        extra = pubsub.get_message(timeout=0.2)
    finally:
        pubsub.close()
    # Then the first write and the replacement were published, the refused one was not
    assert [m["status"] for m in got] == ["FAILURE", "SUCCESS"]
    assert got[0]["result"]["exc_message"] == ["lock_timeout"]
    assert extra is None


def test_non_terminal_state_is_replaced_and_a_foreign_key_is_left_alone(redis_client, app) -> None:
    # Given a STARTED state stored by Celery itself, and a hash sitting under a result's name
    started, foreign, plain = new_id(), new_id(), new_id()
    app.backend.store_result(started, None, "STARTED")
    redis_client.hset(result_key(foreign), "not", "ours")
    # When results are written for all three in one call
    written = write_results(
        redis_client, [_failure(started, "E"), _trained(foreign, "E"), _trained(plain, "E")], 60
    )
    # Then the STARTED state was replaced, the hash left as it was, and the third written
    assert written == 2
    assert meta(redis_client, started)["status"] == "FAILURE"
    assert redis_client.hgetall(result_key(foreign)) == {b"not": b"ours"}
    assert meta(redis_client, plain)["result"]["status"] == "trained"


# -- the lock's timings when the results ride with the commit --------------------------------------


def test_the_last_jobs_lock_timings_are_written_once_the_process_is_idle(
    own_runtime, make_model, redis_client, app
) -> None:
    """A job whose results ride in its commit's round trip leaves its lock timings for the next
    round trip; with no next job, the process writes them ``IDLE_FLUSH_SECONDS`` later."""
    # Given a model
    model = make_model()
    # When one job trains three events, its results riding with the commit, and no job follows
    ids = [new_id() for _ in range(3)]
    run_messages(
        [step_message(i, raw_event(model, f"idle-{k}")) for k, i in enumerate(ids)],
        results_with_commit=True,
    )
    # Then every result is stored
    assert [meta(redis_client, i)["result"]["status"] for i in ids] == ["trained"] * 3
    # And the section's lock wait and hold reach the exporter's histograms without another job

    def counted() -> dict[str, float]:
        raw = redis_client.hgetall(ModelKeys(model).lock_stats)
        return {k.decode(): float(v) for k, v in raw.items()}

    deadline = time.monotonic() + 10
    while not counted() and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = counted()
    assert sum(v for k, v in stats.items() if k.startswith("w:") and k != "w:sum") == 1
    assert sum(v for k, v in stats.items() if k.startswith("h:") and k != "h:sum") == 1
    assert not own_runtime.trainer.timings_waiting
