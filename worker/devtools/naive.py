"""The naive reference design, kept for ``itrain bench`` only: one task per event, redis-py's
``Lock`` with its defaults (100 ms polling), GET the weights, one step, SET the weights.

It is the baseline the benchmark compares against; it has none of the guarantees of the real
path (no fencing, no de-duplication, no micro-batching) and is not meant for use. Production
workers never register it: this module is the app module of the benchmark's own workers,
``celery -A worker.devtools.naive worker``, which serve the production tasks and this one.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from producer.keys import ModelKeys
from worker.consume import tasks as _tasks  # noqa: F401 - the production tasks too
from worker.consume.app import app
from worker.consume.messages import validate_event
from worker.consume.runtime import get_runtime
from worker.engine.checkpoint import DTYPE, Checkpoint, ModelConfig
from worker.engine.features import featurize
from worker.engine.mlp import PerEventSGD
from worker.engine.targets import make_target

__all__ = ["APP", "TASK_NAIVE", "app", "naive_init", "naive_key", "naive_train_step"]

TASK_NAIVE = "itrain.bench_naive_step"
#: The ``-A`` argument that starts a worker with this task registered.
APP = "worker.devtools.naive"


def naive_key(model: str) -> str:
    return ModelKeys(model).prefix + "naive"


def naive_init(client: Any, model: str, config: ModelConfig) -> None:
    client.set(naive_key(model), Checkpoint.initial(config).theta.astype(DTYPE).tobytes())


@app.task(name=TASK_NAIVE)
def naive_train_step(event: dict[str, Any]) -> dict[str, Any]:
    rt = get_runtime()
    ev = validate_event(event)
    config = ModelConfig()
    x = featurize(ev)
    t = make_target(ev, config.outputs, rt.settings.targets).tolist()
    client = rt.store_client
    key = naive_key(ev.model)
    start = time.perf_counter()
    with client.lock(ModelKeys(ev.model).prefix + "naive-lock", timeout=rt.settings.lock_timeout):
        acquired = time.perf_counter()
        raw = client.get(key)
        assert isinstance(raw, bytes), f"{key} holds no weights"
        theta = np.frombuffer(raw, dtype=DTYPE).astype(np.float64)
        loss = PerEventSGD(config.shape, config.lr, config.clip, theta).step(x, t)
        client.set(key, theta.astype(DTYPE).tobytes())
        released = time.perf_counter()
    if rt.settings.record_timings:
        client.lpush(
            ModelKeys(ev.model).prefix + "timings", f"{acquired - start:.6f} {released - acquired:.6f} 1"
        )
    return {"status": "trained", "model": ev.model, "event_id": ev.event_id, "loss": loss}
