"""Snapshots of a model's checkpoint, and rolling back to one.

Every ``ITRAIN_SNAPSHOT_EVERY`` steps the trainer copies the checkpoint it just committed to
``itrain:{m}:snap:<version>`` (``lua/snapshot.lua``), keeping the last ``ITRAIN_SNAPSHOT_KEEP``.
``rollback`` restores one under the model's lock (``lua/restore.lua``) as a new version: versions
never go back, ``step`` keeps counting the events trained, the evaluation window restarts, and
the undone events keep their de-dup markers (a re-send answers ``duplicate``: it was trained
once, then undone on purpose). Each snapshot keeps the evaluation window of its moment, so the
listing shows its windowed metrics, and a guard picks the best one (``worker.engine.guard``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from producer.errors import CheckpointError, ModelError, ModelNotInitialisedError
from producer.evaluation import window_metrics
from producer.keys import ModelKeys
from producer.settings import Settings
from worker.lua import load_lua
from worker.store.lock import ModelLock
from worker.store.model_store import Store

__all__ = ["Snapshot", "due", "list_snapshots", "rollback", "take_snapshot"]


@dataclass(frozen=True)
class Snapshot:
    version: int
    step: int
    snapshot_at: float
    loss_ema: float | None
    #: The online evaluation over the window at that moment (count, logloss, mse, accuracy).
    eval: dict[str, Any] | None = None


def due(step_before: int, step_after: int, every: int) -> bool:
    """Whether a commit that moved the step from ``step_before`` to ``step_after`` crossed a
    multiple of ``every`` (0: snapshots are off)."""
    return every > 0 and step_after // every > step_before // every


def take_snapshot(client: redis.Redis, model: str, keep: int, attempts: int = 5) -> int | None:
    """Copy the current checkpoint; returns its version (None when the model has none)."""
    keys = ModelKeys(model)
    script = client.register_script(load_lua("worker.store", "snapshot"))
    for _ in range(attempts):
        # The script declares every key it touches, and snapshot names hold versions: read the
        # version and the list first (the script checks they are still so; under the model's
        # lock they are).
        pipe = client.pipeline(transaction=True)
        pipe.hget(keys.ckpt, "version")
        pipe.lrange(keys.snapshots, 0, -1)
        current, kept = pipe.execute()
        if current is None:
            return None
        versions = [current.decode(), *(v.decode() for v in kept)]
        version = script(
            keys=[keys.ckpt, keys.snapshots, keys.eval_ring, *(keys.snapshot_prefix + v for v in versions)],
            args=[keep, time.time(), *versions],
        )
        if version is None:
            return None
        if int(version) != -1:
            return int(version)
    raise CheckpointError(f"model {model!r} changed during each of {attempts} snapshot attempts")


def list_snapshots(client: redis.Redis, model: str) -> list[Snapshot]:
    """The kept snapshots, newest first."""
    keys = ModelKeys(model)
    versions = [int(v) for v in client.lrange(keys.snapshots, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for v in versions:
        pipe.hmget(
            keys.snapshot_prefix + str(v),
            ["step", "snapshot_at", "loss_ema", "eval_wn", "eval_cap", "eval_ring"],
        )
    out = []
    for v, (step, at, ema, wn, cap, ring) in zip(versions, pipe.execute(), strict=True):
        if step is not None:
            ev = window_metrics(ring, wn, int(cap)) if cap else None
            out.append(
                Snapshot(v, int(step), float(at or 0), float(ema) if ema not in (None, b"") else None, ev)
            )
    return out


def rollback(client: redis.Redis, model: str, to_version: int, settings: Settings) -> int:
    """Restore snapshot ``to_version`` as a new version of ``model``; returns that version."""
    with ModelLock(client, model, settings):
        done = Store(client, settings).restore(model, to_version, trip=False)
    if done.ok:
        return done.version
    reason = done.reason
    if reason == "no-model":
        raise ModelNotInitialisedError(f"model {model!r} does not exist; `itrain models` lists the models")
    if reason == "no-snapshot":
        kept = ", ".join(str(s.version) for s in list_snapshots(client, model)) or "none"
        raise ModelError(f"model {model!r} has no snapshot of version {to_version} (kept: {kept})")
    raise ModelError(f"snapshot {to_version} of {model!r} belongs to a model since replaced (init --force)")
