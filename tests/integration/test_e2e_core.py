"""End to end against real processes: a private redis-server and ``celery -A worker worker``.

One module-scoped group of two worker processes (two pool processes each) serves every test;
each test trains its own freshly named model, so the workers' checkpoint caches never mix.
Nothing here mocks Redis or Celery.
"""

from __future__ import annotations

import base64
import itertools
import math
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.errors import InvalidEventError, ItrainError, NonFiniteUpdateError, TargetError
from producer.events import InteractionData
from producer.keys import MODELS, UNROUTED_DEAD, ModelKeys
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope
from tests.helpers import Workers, make_event
from worker.engine.features import featurize
from worker.engine.mlp import Shape, forward, sigmoid

TRAINED_KEYS = {"status", "model", "event_id", "step", "version", "loss"}
SKIPPED_KEYS = {"status", "model", "event_id", "reason"}
DUPLICATE_KEYS = {"status", "model", "event_id"}
WAIT = 120.0


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """Two ``celery -A worker worker`` processes, concurrency 2, on the default queue."""
    w = Workers(tmp_path_factory.mktemp("core-workers"))
    try:
        w.start(2, redis_url=redis_url, concurrency=2, prefix="core")
        yield w
    finally:
        w.close()


# -- helpers ----------------------------------------------------------------------------------


def ckpt_state(r: redis.Redis, model: str) -> tuple[bytes, int, int]:
    params, version, step = r.hmget(ModelKeys(model).ckpt, ["params", "version", "step"])
    assert params is not None, f"model {model} has no checkpoint"
    return params, int(version), int(step)


def failures(r: redis.Redis, model: str) -> int:
    return int(r.hget(ModelKeys(model).stats, "failures") or 0)


def push_raw(
    r: redis.Redis,
    queue: str,
    task_id: str,
    *,
    args: list[Any] | None = None,
    body: bytes | None = None,
    task: str = TASK_TRAIN_STEP,
) -> None:
    """Put a message on the queue in the wire format, bypassing the client's validation.

    ``body`` replaces the encoded Celery body with hand-built bytes.
    """
    envelope = orjson.loads(encode_envelope(task, task_id, args if args is not None else [], queue))
    if body is not None:
        envelope["body"] = base64.b64encode(body).decode("ascii")
    r.lpush(queue, orjson.dumps(envelope))


def assert_trained(result: Any, model: str, event_id: str) -> None:
    assert isinstance(result, dict), result
    assert set(result) == TRAINED_KEYS, result
    assert result["status"] == "trained"
    assert result["model"] == model
    assert result["event_id"] == event_id
    assert isinstance(result["step"], int)
    assert result["step"] >= 1
    assert isinstance(result["version"], int)
    assert isinstance(result["loss"], float)
    assert math.isfinite(result["loss"])
    assert result["loss"] >= 0


# -- results follow the contract --------------------------------------------------------------


def test_train_step_and_train_many_results_follow_contract(
    workers: Workers, make_model, client: TrainingClient
) -> None:
    # Given an initialised model
    model = make_model()
    # When one event goes through train_step and five through train_many
    single = make_event(model, 0, "single")
    many = [make_event(model, i, "many") for i in range(1, 6)]
    h_single = client.train_step(single)
    h_many = client.train_many(many)
    # Then each handle resolves to its own trained result, exactly the contract's keys
    results = [h_single.get(timeout=WAIT), *(h.get(timeout=WAIT) for h in h_many)]
    for result, event in zip(results, [single, *many], strict=True):
        assert_trained(result, model, event["event_id"])
    assert {h.state for h in [h_single, *h_many]} == {"SUCCESS"}
    assert sorted(r["step"] for r in results) == [1, 2, 3, 4, 5, 6]
    # And the checkpoint agrees with the results
    stats = client.stats(model)
    assert stats["step"] == 6
    assert stats["interactions"] == 6
    assert stats["version"] == max(r["version"] for r in results)
    assert stats["history_len"] == 6
    assert stats["failures"] == 0


def test_duplicate_event_id_is_reported_and_not_trained_again(
    workers: Workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    model = make_model()
    event = make_event(model, 0, "dup")
    first = client.train_step(event).get(timeout=WAIT)
    assert_trained(first, model, event["event_id"])
    params, version, step = ckpt_state(redis_client, model)
    # When the same event_id comes again, alone and twice inside one batch
    again = client.train_step(event).get(timeout=WAIT)
    other = make_event(model, 1, "dup2")
    batch = [h.get(timeout=WAIT) for h in client.train_many([other, other])]
    # Then the repeats are duplicates with exactly the contract's keys, and only `other` trained
    assert again == {"status": "duplicate", "model": model, "event_id": event["event_id"]}
    assert set(again) == DUPLICATE_KEYS
    assert_trained(batch[0], model, other["event_id"])
    assert batch[1] == {"status": "duplicate", "model": model, "event_id": other["event_id"]}
    assert batch[0]["step"] == step + 1
    stats = client.stats(model)
    assert stats["step"] == 2
    assert stats["interactions"] == 2
    assert ckpt_state(redis_client, model)[1] == version + 1
    assert params != ckpt_state(redis_client, model)[0]


def test_uninitialised_model_is_skipped_and_nothing_is_written(
    workers: Workers, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a model name nobody initialised
    model = f"never-{uuid.uuid4().hex[:12]}"
    events = [make_event(model, i, "skip") for i in range(4)]
    # When events for it go through train_step and train_many
    handles = [client.train_step(events[0]), *client.train_many(events[1:])]
    results = [h.get(timeout=WAIT) for h in handles]
    # Then every job succeeds with the no-op result and a reason
    for h, result, event in zip(handles, results, events, strict=True):
        assert h.state == "SUCCESS"
        assert set(result) == SKIPPED_KEYS, result
        assert result["status"] == "skipped"
        assert result["model"] == model
        assert result["event_id"] == event["event_id"]
        assert isinstance(result["reason"], str)
        assert "not initialised" in result["reason"]
        assert model in result["reason"]
    # And nothing about the model exists in Redis
    assert redis_client.keys(f"itrain:{{{model}}}:*") == []
    assert list(redis_client.scan_iter(match=f"*{model}*", count=1000)) == []
    assert not redis_client.sismember(MODELS, model)
    assert client.stats(model)["initialized"] is False


# -- no lost update under concurrency ---------------------------------------------------------


def _produce(redis_url: str, model: str, tag: str, n: int) -> list[tuple[str, str]]:
    """Sends n events from its own client, alternating train_step runs and train_many calls;
    returns (event_id, task id) pairs."""
    sent: list[tuple[str, str]] = []
    with TrainingClient(redis_url=redis_url) as producer:
        i = 0
        round_no = 0
        while i < n:
            size = min(25 + 15 * (round_no % 4), n - i)
            events = [make_event(model, i + k, tag) for k in range(size)]
            if round_no % 2 == 0:
                handles = [producer.train_step(e) for e in events]
            else:
                handles = producer.train_many(events)
            sent.extend((e["event_id"], h.id) for e, h in zip(events, handles, strict=True))
            i += size
            round_no += 1
    return sent


def test_concurrent_producers_lose_no_update(
    workers: Workers, make_model, client: TrainingClient, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a model, two worker processes, and two producer threads
    model = make_model()
    n_each = 1500
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_produce, redis_url, model, tag, n_each) for tag in ("a", "b")]
        sent = [pair for f in futures for pair in f.result()]
    n = 2 * n_each
    assert len({eid for eid, _ in sent}) == n
    # When every result is in
    handles = [client.app.AsyncResult(task_id) for _, task_id in sent]
    results = client.wait_all(handles, timeout=WAIT)
    # Then every event trained exactly once, with its own step
    for (event_id, _), result in zip(sent, results, strict=True):
        assert_trained(result, model, event_id)
    steps = sorted(r["step"] for r in results)
    assert steps == list(range(1, n + 1))
    # And the checkpoint's step and version agree with the results (no lost update)
    stats = client.stats(model)
    assert stats["step"] == n
    assert stats["interactions"] == n
    assert sum(stats["interactions_by_action"].values()) == n
    versions = {r["version"] for r in results}
    assert stats["version"] == max(versions)
    # every commit that trained something made exactly one new version, starting after init's 1
    assert versions == set(range(2, stats["version"] + 1))
    # events committed together have consecutive steps; later steps never have older versions
    by_step = sorted(results, key=lambda r: r["step"])
    assert all(a["version"] <= b["version"] for a, b in itertools.pairwise(by_step))
    steps_of: dict[int, list[int]] = {}
    for r in results:
        steps_of.setdefault(r["version"], []).append(r["step"])
    for v, group in steps_of.items():
        assert sorted(group) == list(range(min(group), max(group) + 1)), f"version {v}: {group}"
    # A sample of handles also resolves through the plain AsyncResult API
    for h in handles[:: n // 20]:
        assert h.get(timeout=WAIT)["status"] == "trained"
    workers.assert_alive()
    params, version, step = ckpt_state(redis_client, model)
    assert (version, step) == (stats["version"], n)
    assert np.isfinite(np.frombuffer(params, dtype="<f8")).all()


# -- bounded history, no raw user id ----------------------------------------------------------


def test_history_is_capped_at_1000_and_holds_no_user_id(
    workers: Workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    model = make_model()
    secret = f"secret-user-{uuid.uuid4().hex}"
    events = [make_event(model, i, "hist", user_id=f"{secret}-{i % 17}") for i in range(1150)]
    results = client.wait_all(client.train_many(events), timeout=WAIT)
    step_of = {}
    for event, result in zip(events, results, strict=True):
        assert_trained(result, model, event["event_id"])
        step_of[event["event_id"]] = result["step"]
    key = ModelKeys(model).history
    # Then exactly the last 1000 training examples are kept
    assert redis_client.llen(key) == 1000
    raw = redis_client.lrange(key, 0, -1)
    entries = [orjson.loads(e) for e in raw]
    assert {e["event_id"] for e in entries} == {eid for eid, s in step_of.items() if s > 150}
    for blob, entry in zip(raw, entries, strict=True):
        assert secret.encode() not in blob
        assert "user_id" not in entry
        assert len(entry["features"]) == 4
        assert all(isinstance(v, float) and math.isfinite(v) for v in entry["features"])
        assert -1.0 <= entry["features"][2] <= 1.0  # the user's hash, not the user
        assert isinstance(entry["target"], list)
        assert all(0.0 <= v <= 1.0 for v in entry["target"])
        assert isinstance(entry["loss"], float)
        assert entry["loss"] >= 0
        assert entry["step"] == step_of[entry["event_id"]]
    # newest first
    assert [e["step"] for e in entries] == list(range(1150, 150, -1))
    assert client.stats(model)["history_len"] == 1000


# -- malformed messages that reach a worker ---------------------------------------------------

VALID = {"user_id": "u-valid", "action_type": "click", "timestamp": 1_700_000_000.0}

# (case id, event fields or a hand-built body, words the error must contain, routed to the model)
INVALID_CASES = [
    ("missing_user_id", {"action_type": "click", "timestamp": 1_700_000_000.0}, ["user_id"], True),
    ("wrong_type", {**VALID, "user_id": 12345}, ["user_id", "int"], True),
    ("unknown_field", {**VALID, "rating": 5}, ["rating"], True),
    ("nan_literal", b"NaN", ["NaN", "JSON"], True),
    ("non_json_body", b"\x80\x81 this is { not json", ["JSON"], False),
    ("unmapped_action_no_label", {**VALID, "action_type": "hover"}, ["action_type", "hover", "label"], True),
    ("label_length_mismatch", {**VALID, "label": [0.2, 0.8]}, ["label", "2", "1 output"], True),
]


def _dead_elsewhere(r: redis.Redis) -> int:
    """Dead letters of messages whose model cannot be known (unrouted, or `default` if it exists)."""
    return int(r.llen(UNROUTED_DEAD)) + int(r.llen(ModelKeys("default").dead))


@pytest.mark.parametrize(
    ("payload", "words", "routed"),
    [pytest.param(p, w, r, id=case) for case, p, w, r in INVALID_CASES],
)
def test_malformed_message_fails_with_clear_error_and_dead_letter(
    workers: Workers,
    make_model,
    client: TrainingClient,
    redis_client: redis.Redis,
    payload: dict[str, Any] | bytes,
    words: list[str],
    routed: bool,
) -> None:
    # Given a model, its weights and its dead-letter list before
    model = make_model()
    keys = ModelKeys(model)
    params0, version0, step0 = ckpt_state(redis_client, model)
    dead0, failures0, elsewhere0 = redis_client.llen(keys.dead), failures(redis_client, model), 0
    elsewhere0 = _dead_elsewhere(redis_client)
    task_id = str(uuid.uuid4())
    # When the message is pushed in the wire format, bypassing the client's validation
    if isinstance(payload, bytes):
        if payload == b"NaN":  # a JSON-looking body with a NaN literal in the label
            event = orjson.dumps({**VALID, "model": model, "label": 0.5}).replace(b"0.5", b"NaN")
            assert b"NaN" in event
            payload = b"[[" + event + b'], {}, {"callbacks": null, "errbacks": null}]'
        push_raw(redis_client, client.settings.queue, task_id, body=payload)
    else:
        push_raw(redis_client, client.settings.queue, task_id, args=[{**payload, "model": model}])
    # Then the job fails with an error naming the cause
    handle = client.app.AsyncResult(task_id)
    with pytest.raises(ItrainError) as info:
        handle.get(timeout=WAIT)
    assert isinstance(info.value, InvalidEventError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in error {message!r}"
    assert handle.state == "FAILURE"
    # And exactly one dead letter is recorded, naming the task and never the user
    if routed:
        assert redis_client.llen(keys.dead) == dead0 + 1
        assert failures(redis_client, model) == failures0 + 1
        entry_raw = redis_client.lindex(keys.dead, 0)
    else:
        assert redis_client.llen(keys.dead) == dead0
        assert _dead_elsewhere(redis_client) == elsewhere0 + 1
        entry_raw = redis_client.lindex(UNROUTED_DEAD, 0) or redis_client.lindex(ModelKeys("default").dead, 0)
    entry = orjson.loads(entry_raw)
    assert entry["task_id"] == task_id
    assert entry["reason"]
    assert b"u-valid" not in entry_raw
    # And the weights are untouched
    assert ckpt_state(redis_client, model) == (params0, version0, step0)
    # And the worker keeps going: a valid event trains next
    ok = client.train_step({**VALID, "model": model}).get(timeout=WAIT)
    assert ok["status"] == "trained"
    assert ok["step"] == step0 + 1
    workers.assert_alive()


def test_invalid_event_inside_a_batch_fails_alone(
    workers: Workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a raw train_batch message with a bad label between two good events
    model = make_model()
    dead0 = redis_client.llen(ModelKeys(model).dead)
    good = [make_event(model, i, "batch") for i in range(2)]
    bad = make_event(model, 2, "batch", label=[0.1, 0.2, 0.3])
    ids = [str(uuid.uuid4()) for _ in range(3)]
    push_raw(
        redis_client,
        client.settings.queue,
        str(uuid.uuid4()),
        args=[ids, [good[0], bad, good[1]]],
        task=TASK_TRAIN_BATCH,
    )
    handles = [client.app.AsyncResult(i) for i in ids]
    # Then the good events train and the bad one fails on its own
    assert_trained(handles[0].get(timeout=WAIT), model, good[0]["event_id"])
    assert_trained(handles[2].get(timeout=WAIT), model, good[1]["event_id"])
    with pytest.raises(TargetError, match="label"):
        handles[1].get(timeout=WAIT)
    assert redis_client.llen(ModelKeys(model).dead) == dead0 + 1
    assert client.stats(model)["step"] == 2


# -- poisoned update --------------------------------------------------------------------------


def test_non_finite_update_fails_and_leaves_weights_untouched(
    workers: Workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a model whose learning rate makes any step overflow
    model = make_model(lr=1e308, clip=0)
    keys = ModelKeys(model)
    before = ckpt_state(redis_client, model)
    dead0, failures0 = redis_client.llen(keys.dead), failures(redis_client, model)
    # When an event trains it
    handle = client.train_step(make_event(model, 0, "poison"))
    # Then the job fails naming the non-finite update
    with pytest.raises(NonFiniteUpdateError, match="non-finite"):
        handle.get(timeout=WAIT)
    assert handle.state == "FAILURE"
    # And the weights, version and step are unchanged, the failure is dead-lettered
    assert ckpt_state(redis_client, model) == before
    assert redis_client.llen(keys.dead) == dead0 + 1
    assert failures(redis_client, model) == failures0 + 1
    entry = orjson.loads(redis_client.lindex(keys.dead, 0))
    assert entry["task_id"] == handle.id
    assert entry["error"] == "NonFiniteUpdateError"
    assert np.isfinite(np.frombuffer(before[0], dtype="<f8")).all()
    stats = client.stats(model)
    assert stats["step"] == 0
    assert stats["interactions"] == 0


# -- predict ----------------------------------------------------------------------------------


def test_predict_returns_probabilities_from_current_weights(
    workers: Workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    model = make_model(outputs=3, hidden=8, seed=11)
    client.wait_all(client.train_many([make_event(model, i, "pred") for i in range(20)]), timeout=WAIT)
    event = make_event(model, 99, "pred")
    result = client.predict(event).get(timeout=WAIT)
    assert set(result) == {"model", "version", "prediction"}
    assert result["model"] == model
    params, version, _ = ckpt_state(redis_client, model)
    assert result["version"] == version
    prediction = result["prediction"]
    assert len(prediction) == 3
    assert all(isinstance(p, float) and 0.0 < p < 1.0 for p in prediction)
    # The same numbers as the network computed here from the stored weights
    theta = np.frombuffer(params, dtype="<f8").astype(np.float64)
    _, z = forward(theta, Shape(4, 8, 3), featurize(InteractionData.model_validate(event))[None, :])
    np.testing.assert_allclose(prediction, sigmoid(z)[0], rtol=0, atol=1e-12)
