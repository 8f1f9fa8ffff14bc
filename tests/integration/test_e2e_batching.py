"""Throughput features end to end: micro-batches and ``train_many`` chunks must train exactly what
one-event-at-a-time training would, in arrival order, with one result per event.

Two module-scoped groups of real worker processes on one private redis-server:
- ``pair``: two ``celery -A worker worker`` processes, concurrency 2, on the default queue;
- ``serial``: one process, concurrency 1, on its own queue, where arrival order is well defined.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import redis

from producer.client import TrainingClient
from producer.events import InteractionData
from producer.keys import ModelKeys
from producer.settings import DEFAULT_TARGETS, Settings
from tests.helpers import ClientFactory, make_events
from tests.helpers import Workers as Launcher
from worker.engine.checkpoint import ModelConfig
from worker.engine.features import featurize, featurize_many
from worker.engine.mlp import PerEventSGD, init_params, minibatch_step
from worker.engine.targets import make_target

WAIT = 120.0


# -- fixtures ---------------------------------------------------------------------------------


@dataclass
class Group:
    queue: str
    procs: list[Any]


@dataclass
class Workers:
    pair: Group
    serial: Group
    launcher: Launcher


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    launcher = Launcher(tmp_path_factory.mktemp("batching-workers"))
    default_queue = Settings(redis_url=redis_url).queue
    serial_queue = f"itrain-serial-{uuid.uuid4().hex[:8]}"
    try:
        pair = launcher.start(
            2, redis_url=redis_url, env={"ITRAIN_QUEUE": default_queue}, concurrency=2, prefix="pair"
        )
        serial = launcher.start(
            1, redis_url=redis_url, env={"ITRAIN_QUEUE": serial_queue}, concurrency=1, prefix="serial"
        )
        yield Workers(Group(default_queue, pair), Group(serial_queue, serial), launcher)
    finally:
        launcher.close()


@pytest.fixture
def client_for(redis_url: str, make_client: ClientFactory) -> Callable[..., TrainingClient]:
    """``client_for(group, chunk_size=...)``: a TrainingClient publishing to that group's queue."""
    return lambda group, **settings: make_client(redis_url, queue=group.queue, **settings)


# -- helpers ----------------------------------------------------------------------------------


def for_model(events: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [{**e, "model": model} for e in events]


def params_of(r: redis.Redis, model: str) -> np.ndarray:
    raw = r.hget(ModelKeys(model).ckpt, "params")
    assert raw is not None
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


def assert_steps_exact(results: list[Any], n: int) -> None:
    bad = [r for r in results if not (isinstance(r, dict) and r.get("status") == "trained")]
    assert not bad, f"{len(bad)} event(s) not trained, e.g. {bad[:3]}"
    assert sorted(r["step"] for r in results) == list(range(1, n + 1))


# -- a batch trains exactly what one-by-one training would ------------------------------------


def test_per_event_batch_equals_one_by_one_and_in_process(
    workers: Workers, make_model, client_for, redis_client: redis.Redis
) -> None:
    config = {"hidden": 12, "outputs": 1, "lr": 0.3, "clip": 0.5, "seed": 1234}
    model_a = make_model(**config)
    model_b = make_model(**config)
    np.testing.assert_array_equal(params_of(redis_client, model_a), params_of(redis_client, model_b))
    events = make_events(model_a, 150, "eq", labels=True)
    client = client_for(workers.serial)
    # When model A gets them as one train_many call
    results_a = client.wait_all(client.train_many(events), timeout=WAIT)
    # And model B gets them one at a time, each finished before the next is sent
    results_b = [client.train_step(e).get(timeout=WAIT) for e in for_model(events, model_b)]
    # Then both end with the same weights
    theta_a = params_of(redis_client, model_a)
    theta_b = params_of(redis_client, model_b)
    np.testing.assert_allclose(theta_a, theta_b, rtol=0, atol=1e-9)
    assert_steps_exact(results_a, len(events))
    assert [r["step"] for r in results_b] == list(range(1, len(events) + 1))
    # And both equal exact sequential SGD computed here, loss by loss
    cfg = ModelConfig.model_validate(config)
    theta = init_params(cfg.shape, cfg.seed)
    kernel = PerEventSGD(cfg.shape, cfg.lr, cfg.clip, theta)
    losses = []
    for e in events:
        ev = InteractionData.model_validate(e)
        losses.append(kernel.step(featurize(ev), make_target(ev, cfg.outputs, DEFAULT_TARGETS).tolist()))
    np.testing.assert_allclose(theta_a, theta, rtol=0, atol=1e-9)
    np.testing.assert_allclose(theta_b, theta, rtol=0, atol=1e-9)
    np.testing.assert_allclose([r["loss"] for r in results_a], losses, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([r["loss"] for r in results_b], losses, rtol=1e-9, atol=1e-12)
    # And the weights did move
    assert not np.allclose(theta, init_params(cfg.shape, cfg.seed))


# -- arrival order ----------------------------------------------------------------------------


def test_train_many_trains_in_list_order(workers: Workers, make_model, client_for) -> None:
    # Given one worker with one pool process, and a list larger than several chunks
    model = make_model()
    client = client_for(workers.serial, chunk_size=64)
    events = make_events(model, 400, "order", labels=True)
    # When it is sent with one train_many call
    results = client.wait_all(client.train_many(events), timeout=WAIT)
    # Then the steps follow the list order exactly
    for e, r in zip(events, results, strict=True):
        assert r["status"] == "trained"
        assert r["event_id"] == e["event_id"]
    assert [r["step"] for r in results] == list(range(1, len(events) + 1))
    # and chunks were separate commits: more than one version
    assert len({r["version"] for r in results}) > 1


def test_micro_batched_train_steps_train_in_send_order(workers: Workers, make_model, client_for) -> None:
    # Given one worker with one pool process
    model = make_model()
    client = client_for(workers.serial)
    events = make_events(model, 300, "steps", labels=True)
    # When events are sent one train_step at a time without waiting (the worker buffers them)
    handles = [client.train_step(e) for e in events]
    results = client.wait_all(handles, timeout=WAIT)
    # Then their steps follow the send order
    assert [r["event_id"] for r in results] == [e["event_id"] for e in events]
    assert [r["step"] for r in results] == list(range(1, len(events) + 1))
    assert client.stats(model)["step"] == len(events)


# -- one result per event ---------------------------------------------------------------------


def test_every_event_of_train_many_gets_its_own_result(workers: Workers, make_model, client_for) -> None:
    model = make_model()
    client = client_for(workers.pair, chunk_size=16)
    events = make_events(model, 100, "own", labels=True)
    handles = client.train_many(events)
    assert len(handles) == len(events)
    assert len({h.id for h in handles}) == len(events)
    # Each handle resolves on its own, through the plain AsyncResult API, to its own event
    results = [h.get(timeout=WAIT) for h in handles]
    assert [r["event_id"] for r in results] == [e["event_id"] for e in events]
    assert {h.state for h in handles} == {"SUCCESS"}
    assert_steps_exact(results, len(events))


# -- no lost update under batching ------------------------------------------------------------


def test_concurrent_train_many_calls_give_steps_1_to_n(
    workers: Workers, make_model, client_for, redis_client: redis.Redis
) -> None:
    # Given two worker processes and four producer threads, each with its own client
    model = make_model()
    calls, per_call, threads = 5, 120, 4

    def produce(t: int) -> list[tuple[str, str]]:
        client = client_for(workers.pair, chunk_size=40)
        sent = []
        for c in range(calls):
            events = make_events(model, per_call, f"t{t}c{c}", labels=True)
            handles = client.train_many(events)
            sent.extend((e["event_id"], h.id) for e, h in zip(events, handles, strict=True))
        return sent

    with ThreadPoolExecutor(threads) as pool:
        sent = [pair for f in [pool.submit(produce, t) for t in range(threads)] for pair in f.result()]
    n = calls * per_call * threads
    reader = client_for(workers.pair)
    results = reader.wait_all([reader.app.AsyncResult(tid) for _, tid in sent], timeout=WAIT)
    # Then every event trained once, steps are exactly 1..N, and the checkpoint says N
    assert [r["event_id"] for r in results] == [eid for eid, _ in sent]
    assert_steps_exact(results, n)
    stats = reader.stats(model)
    assert stats["step"] == n
    assert stats["interactions"] == n
    versions = {r["version"] for r in results}
    assert stats["version"] == max(versions)
    assert versions == set(range(2, stats["version"] + 1))
    assert np.isfinite(params_of(redis_client, model)).all()
    workers.launcher.assert_alive()  # both groups


# -- minibatch mode ---------------------------------------------------------------------------


def test_minibatch_mode_trains_with_steps_1_to_n(
    workers: Workers, make_model, client_for, redis_client: redis.Redis
) -> None:
    model = make_model(mode="minibatch", seed=5, lr=0.1)
    theta0 = params_of(redis_client, model)
    client = client_for(workers.pair, chunk_size=50)
    events = make_events(model, 500, "mb", labels=True)
    handles = client.train_many(events[:300]) + [client.train_step(e) for e in events[300:]]
    results = client.wait_all(handles, timeout=WAIT)
    assert [r["event_id"] for r in results] == [e["event_id"] for e in events]
    assert_steps_exact(results, len(events))
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in results)
    stats = client.stats(model)
    assert stats["step"] == len(events)
    assert stats["version"] == max(r["version"] for r in results)
    theta = params_of(redis_client, model)
    assert np.isfinite(theta).all()
    assert not np.allclose(theta, theta0)


def test_minibatch_chunk_is_one_vectorised_step(
    workers: Workers, make_model, client_for, redis_client: redis.Redis
) -> None:
    # Given a minibatch model and one chunk of events trained by one worker process
    config = {"mode": "minibatch", "hidden": 10, "outputs": 1, "lr": 0.2, "clip": 1.0, "seed": 9}
    model = make_model(**config)
    client = client_for(workers.serial)
    events = make_events(model, 100, "mb1", labels=True)
    results = client.wait_all(client.train_many(events), timeout=WAIT)
    assert_steps_exact(results, len(events))
    # Then the weights equal one mini-batch SGD step computed here, and the losses match
    cfg = ModelConfig.model_validate(config)
    evs = [InteractionData.model_validate(e) for e in events]
    T = np.stack([make_target(ev, cfg.outputs, DEFAULT_TARGETS) for ev in evs])
    theta, losses = minibatch_step(
        init_params(cfg.shape, cfg.seed), cfg.shape, featurize_many(evs), T, cfg.lr, cfg.clip
    )
    np.testing.assert_allclose(params_of(redis_client, model), theta, rtol=0, atol=1e-9)
    np.testing.assert_allclose([r["loss"] for r in results], losses, rtol=1e-9, atol=1e-12)
