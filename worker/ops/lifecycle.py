"""A model's lifecycle beyond training, as Python functions (each ``itrain`` command calls one).

| command | function |
|---|---|
| ``itrain init`` | ``worker.store.model_store.Store.create`` |
| ``itrain snapshots`` | ``list_snapshots(client, model)`` |
| (every ``ITRAIN_SNAPSHOT_EVERY`` steps) | ``take_snapshot(client, model, keep)`` |
| ``itrain rollback --to V`` | ``rollback(client, model, V, settings)`` |
| ``itrain export --out F`` | ``export_model(store, model, F, settings.targets)`` |
| ``itrain import F`` | ``import_model(store, F, model, force=...)`` |
| ``itrain guard`` / ``init --guard-*`` | ``set_guard(client, model, Guard(W, R), settings)`` |
| ``itrain resume`` | ``resume(client, model, settings)`` |
| ``itrain delete --yes`` | ``delete_model(client, model)`` (below) |
| ``itrain stats`` (``eval``) | ``producer.stats.read_stats(client, model)`` |
| in-process predictions | ``producer.ModelReader(model).predict(event)`` |

``client`` is a ``redis.Redis`` (``producer.redis_conn.connect(settings.store)``), ``store`` a
``worker.store.model_store.Store(client, settings)``.
"""

from __future__ import annotations

import redis

from producer.errors import ModelNotInitialisedError
from producer.keys import MODELS, ModelKeys
from worker.engine.guard import Guard
from worker.ops.portable import export_model, import_model
from worker.store.guard import resume, set_guard
from worker.store.snapshots import list_snapshots, rollback, take_snapshot

__all__ = [
    "Guard",
    "delete_model",
    "export_model",
    "import_model",
    "list_snapshots",
    "resume",
    "rollback",
    "set_guard",
    "take_snapshot",
]

#: Keys deleted per command: bounded, so a model with millions of markers never blocks Redis.
BATCH = 1000


def delete_model(client: redis.Redis, model: str) -> int:
    """Remove ``model``: its name from the models set, then every key of it (checkpoint, counters,
    history, dead letters, lock, timings, event markers of every generation), a thousand at a time
    (``SCAN``, then ``UNLINK``). Returns the number of keys removed.

    The checkpoint goes first: a worker's commit in flight is then refused (it is fenced on the
    checkpoint it read) instead of bringing the model back; its events answer ``skipped``.
    """
    keys = ModelKeys(model)
    if not client.exists(keys.ckpt) and not client.sismember(MODELS, model):
        raise ModelNotInitialisedError(f"model {model!r} does not exist; `itrain models` lists the models")
    pipe = client.pipeline(transaction=True)
    pipe.unlink(keys.ckpt)
    pipe.srem(MODELS, model)
    removed = int(pipe.execute()[0])
    # Every key of the model shares its hash tag prefix; glob characters in the name are escaped.
    pattern = _escape(keys.prefix) + "*"
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=BATCH):
        batch.append(key)
        if len(batch) >= BATCH:
            removed += int(client.unlink(*batch))
            batch = []
    if batch:
        removed += int(client.unlink(*batch))
    return removed


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
