"""``ITRAIN_HASH_KEY``: workers key the user-id hash with it (a stored feature cannot be reversed
with a dictionary of user ids), a ModelReader with the same key predicts as the workers do, and a
worker without it says so at start."""

from __future__ import annotations

import uuid

import orjson
import pytest

from producer.client import TrainingClient
from producer.features import Featurizer
from producer.keys import ModelKeys
from producer.model_reader import ModelReader
from producer.settings import Settings
from tests.helpers import Workers, make_event, wait_until

SECRET = "a-secret-only-the-workers-know"


def test_keyed_hash_in_the_worker_and_the_reader(
    workers: Workers, redis_url, make_model, redis_client
) -> None:
    # Given a worker with a hash key
    queue = f"itrain-key-{uuid.uuid4().hex[:6]}"
    workers.start(1, redis_url=redis_url, env={"ITRAIN_HASH_KEY": SECRET, "ITRAIN_QUEUE": queue})
    model = make_model()
    keyed = Settings(redis_url=redis_url, queue=queue, hash_key=SECRET)
    # When events train through it
    with TrainingClient(settings=keyed) as client:
        events = [make_event(model, i, "hk") for i in range(10)]
        assert {r["status"] for r in client.wait_all(client.train_many(events), timeout=60)} == {"trained"}
        remote = client.predict(events[0]).get(timeout=60)
    # Then the stored user feature is the keyed hash, not the plain one a dictionary would find
    entries = redis_client.lrange(ModelKeys(model).history, 0, -1)
    history = {h["event_id"]: h for h in map(orjson.loads, entries)}
    user = events[0]["user_id"]
    stored = history[events[0]["event_id"]]["features"][2]
    assert stored == Featurizer(keyed.hash_key_bytes).user(user)
    assert stored != Featurizer().user(user)
    # And a ModelReader with the same key predicts exactly as the worker
    with ModelReader(model, settings=keyed) as reader:
        local = reader.predict(events[0])
    assert local["version"] == remote["version"]
    assert local["prediction"] == pytest.approx(remote["prediction"], abs=1e-12, rel=0)


def test_worker_without_a_hash_key_warns_at_start(workers: Workers, redis_url) -> None:
    queue = f"itrain-nokey-{uuid.uuid4().hex[:6]}"
    (proc,) = workers.start(1, redis_url=redis_url, env={"ITRAIN_QUEUE": queue})
    log = workers.logs[proc.pid]
    wait_until(lambda: "ITRAIN_HASH_KEY is not set" in log.read_text(), 30, "the warning in the worker's log")
