"""A first end-to-end pass: one event and a batch through a real worker process."""

from __future__ import annotations

from producer.client import TrainingClient
from tests.helpers import make_event


def test_train_step_returns_trained_result(start_workers, make_model, client: TrainingClient) -> None:
    # Given a model and a worker
    model = make_model()
    start_workers(1)
    # When one event is enqueued
    handle = client.train_step(make_event(model))
    # Then its handle resolves to the contract's result
    result = handle.get(timeout=30)
    assert result["status"] == "trained"
    assert result["model"] == model
    assert result["step"] == 1
    assert result["version"] == 2
    assert result["loss"] > 0
    assert client.stats(model)["step"] == 1
