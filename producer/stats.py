"""Reading a model's statistics (``itrain stats`` and ``TrainingClient.stats``); Redis only."""

from __future__ import annotations

from typing import Any

import redis

from producer.keys import ModelKeys

__all__ = ["read_stats"]


def _int(value: bytes | None) -> int:
    return int(value) if value is not None else 0


def _float(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


def read_stats(client: redis.Redis, model: str) -> dict[str, Any]:
    """The model's figures in one round trip; ``version`` and ``step`` come from the checkpoint,
    ``redis_memory_used`` (bytes) from the store's server."""
    keys = ModelKeys(model)
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.ckpt, ["version", "step", "loss_last", "loss_ema"])
    pipe.hmget(keys.stats, ["interactions", "failures"])
    pipe.hgetall(keys.actions)
    pipe.llen(keys.history)
    pipe.llen(keys.dead)
    # INFO, not MEMORY STATS or CONFIG: managed Redis and least-privilege users allow it.
    pipe.info("memory")
    (version, step, loss_last, loss_ema), (interactions, failures), actions, hist, dead, memory = (
        pipe.execute()
    )
    return {
        "model": model,
        "initialized": version is not None,
        "version": _int(version) if version is not None else None,
        "step": _int(step),
        "interactions": _int(interactions),
        "interactions_by_action": {k.decode(): int(v) for k, v in sorted(actions.items())},
        "loss_last": _float(loss_last),
        "loss_ema": _float(loss_ema),
        "history_len": int(hist),
        "failures": _int(failures),
        "dead_letters": int(dead),
        # Bytes the whole Redis server holds (``INFO memory`` ``used_memory``), every model and
        # every key of the store's server, not this model alone.
        "redis_memory_used": int(memory["used_memory"]),
    }
