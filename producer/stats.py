"""Reading a model's statistics (``itrain stats`` and ``TrainingClient.stats``); Redis only."""

from __future__ import annotations

from typing import Any

import orjson
import redis

from producer.evaluation import eval_report
from producer.keys import ModelKeys

__all__ = ["guard_report", "queue_stats", "read_stats", "stats_from_replies"]


def _int(value: bytes | None) -> int:
    return int(value) if value is not None else 0


def _float(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


#: The checkpoint's fields of the online evaluation and the guard, in ``read_stats``'s order.
EVAL_FIELDS = ["config", "eval", "eval_wn", "eval_cap", "guard", "paused", "trips", "guard_ref"]


def guard_report(
    guard: bytes | None, paused: bytes | None, trips: bytes | None, ref: bytes | None
) -> dict[str, Any]:
    """``eval["guard"]`` of ``itrain stats``: its window and ratio (``None`` without a guard), whether
    training is paused, the trips so far and the reference (best recent snapshot) it compares to."""
    parts, refs = (guard or b"").split(), (ref or b"").split()
    window, ratio = parts[:2] if len(parts) >= 2 else (None, None)
    loss, version = refs if len(refs) == 2 else (None, None)
    return {
        "window": int(window) if window else None,
        "ratio": float(ratio) if ratio else None,
        "paused": bool(paused),
        "trips": _int(trips),
        "reference_loss": float(loss) if loss else None,
        "reference_version": int(version) if version else None,
    }


def read_stats(client: redis.Redis, model: str) -> dict[str, Any]:
    """The model's figures in one round trip; ``version`` and ``step`` come from the checkpoint,
    ``redis_memory_used`` (bytes) from the store's server, ``eval`` (``producer.evaluation``) from
    the state the trainer commits with the weights."""
    pipe = client.pipeline(transaction=False)
    queue_stats(pipe, model)
    return stats_from_replies(model, pipe.execute())


def queue_stats(pipe: Any, model: str) -> None:
    """Queue the commands of ``read_stats`` on a pipeline (redis-py's, blocking or asyncio)."""
    keys = ModelKeys(model)
    pipe.hmget(keys.ckpt, ["version", "step", "loss_last", "loss_ema", *EVAL_FIELDS])
    pipe.get(keys.eval_ring)
    pipe.hmget(keys.stats, ["interactions", "failures"])
    pipe.hgetall(keys.actions)
    pipe.llen(keys.history)
    pipe.llen(keys.dead)
    # INFO, not MEMORY STATS or CONFIG: managed Redis and least-privilege users allow it.
    pipe.info("memory")


def stats_from_replies(model: str, replies: list[Any]) -> dict[str, Any]:
    """The statistics object from the replies to ``queue_stats``'s commands."""
    ckpt, ring, (interactions, failures), actions, hist, dead, memory = replies
    version, step, loss_last, loss_ema, config, evaluation, wn, cap, guard, paused, trips, ref = ckpt
    outputs = int(orjson.loads(config).get("outputs", 1)) if config else 1
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
        # The online evaluation, with the guard's state (``None`` for a model that does not exist).
        "eval": None
        if version is None
        else {
            **eval_report(evaluation, wn, cap, ring, outputs),
            "guard": guard_report(guard, paused, trips, ref),
        },
    }
