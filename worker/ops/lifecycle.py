"""A model's lifecycle beyond training: removing a model and every key it has."""

from __future__ import annotations

import redis

from producer.errors import ModelNotInitialisedError
from producer.keys import MODELS, ModelKeys

__all__ = ["delete_model"]

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
