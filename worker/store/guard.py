"""Setting a model's guard and resuming a paused model (``lua/guard.lua``, under the model's lock).

The guard's rule is in ``worker.engine.guard``; the trip itself is the trainer's
(``Store.restore`` with ``trip=True``, fenced like a commit).
"""

from __future__ import annotations

import uuid

import redis

from producer.errors import ModelNotInitialisedError
from producer.keys import ModelKeys
from producer.settings import Settings
from worker.engine.guard import Guard
from worker.lua import load_lua
from worker.store.lock import ModelLock

__all__ = ["resume", "set_guard"]


def _run(client: redis.Redis, model: str, settings: Settings, *args: str | int) -> bool:
    keys = ModelKeys(model)
    script = client.register_script(load_lua("worker.store", "guard"))
    with ModelLock(client, model, settings):
        ok, paused = script(keys=[keys.ckpt, keys.eval_ring], args=[args[0], uuid.uuid4().hex, *args[1:]])
    if not ok:
        raise ModelNotInitialisedError(f"model {model!r} does not exist; `itrain models` lists the models")
    return bool(paused)


def set_guard(client: redis.Redis, model: str, guard: Guard | None, settings: Settings) -> None:
    """Give ``model`` a guard (or, with ``None``, remove it). The evaluation window restarts and
    widens to the guard's; the guard arms at the next snapshot taken with its window full."""
    _run(client, model, settings, "set", guard.encode() if guard else "", settings.eval_window)


def resume(client: redis.Redis, model: str, settings: Settings) -> bool:
    """Re-enable training on a model its guard paused; the window restarts. Returns whether the
    model was paused."""
    return _run(client, model, settings, "resume")
