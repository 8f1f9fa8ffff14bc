"""The engine: the spec's ``trainStep`` pipeline for a batch of events of one model.

1. Validation    the model must be initialised (else the no-op ``skipped`` result)
2. Preprocessing ``features.featurize_many``, before the lock
3. Target        ``targets.make_target``
4. Forward       ``mlp.PerEventSGD.step`` / ``mlp.minibatch_step``
5. Backward      the same calls: gradient, clipping, refused if non-finite
6. Bookkeeping   ``store.Store.commit``: step, version, counters, loss, history, event markers
7. Cleanup       the same commit trims history and dead letters; markers and results expire

Steps 3 to 6 run under the model's lock, and the commit is fenced by the checkpoint version.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import redis

from producer.errors import (
    ItrainError,
    LockTimeoutError,
    ModelNotInitialisedError,
    NonFiniteUpdateError,
    TargetError,
)
from producer.events import InteractionData
from producer.keys import ModelKeys
from producer.settings import Settings
from worker.engine.checkpoint import Checkpoint
from worker.engine.features import featurize, featurize_many
from worker.engine.mlp import PerEventSGD, forward, minibatch_step, sigmoid
from worker.engine.targets import make_target
from worker.store.lock import ModelLock
from worker.store.model_store import Store
from worker.store.results import Outcome, failure_payload

__all__ = ["Job", "Trainer", "dead_letter_entry"]

logger = logging.getLogger("itrain.trainer")


@dataclass(frozen=True, slots=True)
class Job:
    """One valid event and the id of the result it owes."""

    task_id: str
    event: InteractionData


def dead_letter_entry(
    task_id: str,
    exc: BaseException,
    *,
    model: str | None = None,
    event_id: str | None = None,
    action_type: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A dead-letter record: what failed and why. Never the raw user id, never the raw payload."""
    entry: dict[str, Any] = {
        "task_id": task_id,
        "model": model,
        "event_id": event_id,
        "action_type": action_type,
        "error": type(exc).__name__,
        "reason": str(exc)[:1000],
        "at": datetime.now(UTC).isoformat(),
    }
    if extra:
        entry.update(extra)
    return orjson.dumps(entry)


class Trainer:
    """Trains batches of events against the shared checkpoints; one per worker process.

    Keeps each model's last committed checkpoint in memory, so a worker that committed the
    previous batch reads no weights at all for the next one (the read script answers with the
    version only).
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._cache: dict[str, Checkpoint] = {}

    # -- training -----------------------------------------------------------------------------

    def train(self, jobs: Sequence[Job]) -> list[Outcome]:
        """One outcome per job, in the same order; events of a model train in arrival order."""
        by_model: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(job.event.model, []).append(i)
        outcomes: list[Outcome | None] = [None] * len(jobs)
        for model, idxs in by_model.items():
            sub = [jobs[i] for i in idxs]
            try:
                done = self._train_model(model, sub)
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # Redis is away: the messages go back to the queue and come again
            except Exception as exc:
                # Anything else would fail again on every redelivery: end these jobs now, with a
                # result and a dead letter each, instead of requeueing them forever.
                logger.exception("model=%s batch of %d failed", model, len(sub))
                error = exc if isinstance(exc, ItrainError) else ItrainError(f"{type(exc).__name__}: {exc}")
                done = self._fail_all(model, sub, error)
            for i, outcome in zip(idxs, done, strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _train_model(self, model: str, jobs: list[Job]) -> list[Outcome]:
        X = featurize_many([j.event for j in jobs])  # outside the lock: it needs no shared state
        lock = ModelLock(self.store.client, model, self.settings)
        attempts = self.settings.commit_retries
        for attempt in range(attempts):
            try:
                lock.acquire()
            except LockTimeoutError as exc:
                return self._fail_all(model, jobs, exc)
            try:
                outcomes = self._critical_section(model, jobs, X)
            finally:
                held = lock.release()
            self._record_timing(model, lock.waited, held, len(jobs))
            if outcomes is not None:
                return outcomes
            # Fenced out: another worker committed first (our lock had expired). Retry on its weights.
            self._cache.pop(model, None)
            logger.warning(
                "model=%s commit refused (attempt %d/%d); retrying on fresh weights",
                model,
                attempt + 1,
                attempts,
            )
        return self._fail_all(model, jobs, ItrainError(f"commit refused {attempts} times in a row"))

    def _critical_section(
        self, model: str, jobs: list[Job], X: npt.NDArray[np.float64]
    ) -> list[Outcome] | None:
        """Read, train, commit. ``None`` when the fenced commit was refused."""
        read = self.store.read(model, self._cache.get(model), [j.event.event_id for j in jobs])
        ckpt = read.checkpoint
        if ckpt is None:
            self._cache.pop(model, None)
            return [self._skipped(j) for j in jobs]
        cfg = ckpt.config

        outcomes: list[Outcome | None] = [None] * len(jobs)
        dead: list[bytes] = []
        train_idx: list[int] = []
        targets: list[npt.NDArray[np.float64]] = []
        first_copy: dict[str, int] = {}
        copies: list[tuple[int, int]] = []  # (index, index of the first copy in this batch)
        for i, job in enumerate(jobs):
            ev = job.event
            if read.done[i]:
                outcomes[i] = Outcome.duplicate(job.task_id, model, ev.event_id)
                continue
            try:
                target = make_target(ev, cfg.outputs, self.settings.targets)
            except TargetError as exc:
                outcomes[i] = Outcome.failure(job.task_id, exc)
                dead.append(_dead(job, exc))
                continue
            if ev.event_id in first_copy:
                copies.append((i, first_copy[ev.event_id]))  # answered once the first one is
                continue
            first_copy[ev.event_id] = i
            targets.append(target)
            train_idx.append(i)

        theta = ckpt.theta.copy()  # the cached copy stays as committed if the commit is refused
        trained: list[tuple[int, float]] = []
        if cfg.mode == "per_event":
            kernel = PerEventSGD(cfg.shape, cfg.lr, cfg.clip, theta)
            for i, t in zip(train_idx, targets, strict=True):
                try:
                    trained.append((i, kernel.step(X[i], t.tolist())))
                except NonFiniteUpdateError as exc:
                    outcomes[i] = Outcome.failure(jobs[i].task_id, exc)
                    dead.append(_dead(jobs[i], exc))
        elif train_idx:
            try:
                theta, losses = minibatch_step(
                    theta, cfg.shape, X[train_idx], np.stack(targets), cfg.lr, cfg.clip
                )
                trained = list(zip(train_idx, losses.tolist(), strict=True))
            except NonFiniteUpdateError as exc:
                for i in train_idx:
                    outcomes[i] = Outcome.failure(jobs[i].task_id, exc)
                    dead.append(_dead(jobs[i], exc))

        # A copy of an event met earlier in this batch: refused like its first copy, else a
        # duplicate. Decided before the commit so its dead letter goes in the same write.
        for i, j in copies:
            original = outcomes[j]
            if original is not None and original.status == "FAILURE":
                outcomes[i] = Outcome(jobs[i].task_id, "FAILURE", original.result)
                dead.append(_dead(jobs[i], NonFiniteUpdateError(original.result["exc_message"][0])))
            else:
                outcomes[i] = Outcome.duplicate(jobs[i].task_id, model, jobs[i].event.event_id)

        alpha = self.settings.loss_ema_alpha
        ema = ckpt.loss_ema
        for _, loss in trained:
            ema = loss if ema is None else alpha * loss + (1.0 - alpha) * ema
        now = time.time()
        first = ckpt.step
        keep = trained[-self.settings.history_max :]
        target_of = dict(zip(train_idx, targets, strict=True))
        offset = len(trained) - len(keep)
        history = [
            orjson.dumps(
                {
                    "step": first + offset + k + 1,
                    "event_id": jobs[i].event.event_id,
                    "action_type": jobs[i].event.action_type,
                    "features": X[i].tolist(),
                    "target": target_of[i].tolist(),
                    "loss": loss,
                    "event_time": jobs[i].event.timestamp.timestamp(),
                    "trained_at": now,
                }
            )
            for k, (i, loss) in enumerate(keep)
        ]
        commit = self.store.commit(
            model,
            expected=ckpt,
            params=theta.tobytes() if trained else b"",
            event_ids=[jobs[i].event.event_id for i, _ in trained],
            loss_last=trained[-1][1] if trained else 0.0,
            loss_ema=ema if ema is not None else 0.0,
            actions=dict(Counter(jobs[i].event.action_type for i, _ in trained)),
            history=history,
            dead=dead,
        )
        if not commit.ok:
            return None
        for k, (i, loss) in enumerate(trained):
            step = commit.first_step + k + 1
            outcomes[i] = Outcome.success(
                jobs[i].task_id,
                {
                    "status": "trained",
                    "model": model,
                    "event_id": jobs[i].event.event_id,
                    "step": step,
                    "version": commit.version,
                    "loss": loss,
                },
            )
            if step % self.settings.log_every == 0:
                logger.info(
                    "model=%s step=%d version=%d loss=%.6f loss_ema=%.6f",
                    model,
                    step,
                    commit.version,
                    loss,
                    ema,
                )
        # Nothing trained means nothing written: the checkpoint (and its tag) is unchanged.
        self._cache[model] = (
            Checkpoint(
                config=cfg,
                theta=theta,
                version=commit.version,
                step=first + len(trained),
                loss_ema=ema,
                loss_last=trained[-1][1],
                cid=commit.cid,
                gen=ckpt.gen,
            )
            if trained
            else ckpt
        )
        return [o for o in outcomes if o is not None]

    # -- prediction ---------------------------------------------------------------------------

    def predict(self, event: InteractionData) -> dict[str, Any]:
        """The model's output for an event, from the current checkpoint (no lock needed: the
        checkpoint is read in one atomic command)."""
        model = event.model
        ckpt = self.store.read(model, self._cache.get(model), ()).checkpoint
        if ckpt is None:
            raise ModelNotInitialisedError(
                f"model {model!r} is not initialised; run `itrain init --model {model}`"
            )
        self._cache[model] = ckpt
        _, Z = forward(ckpt.theta, ckpt.config.shape, featurize(event)[None, :])
        return {"model": model, "version": ckpt.version, "prediction": sigmoid(Z)[0].tolist()}

    # -- helpers ------------------------------------------------------------------------------

    def _skipped(self, job: Job) -> Outcome:
        model = job.event.model
        return Outcome.success(
            job.task_id,
            {
                "status": "skipped",
                "model": model,
                "event_id": job.event.event_id,
                "reason": f"model {model!r} is not initialised; run `itrain init --model {model}`",
            },
        )

    def _fail_all(self, model: str, jobs: list[Job], exc: ItrainError) -> list[Outcome]:
        self.store.dead_letter(model, [_dead(j, exc) for j in jobs])
        logger.error("model=%s %d event(s) failed: %s", model, len(jobs), exc)
        # A redelivered event may already have its "trained" result: never hide it.
        return [Outcome(j.task_id, "FAILURE", failure_payload(exc), keep_existing=True) for j in jobs]

    def _record_timing(self, model: str, waited: float, held: float, n: int) -> None:
        if self.settings.record_timings:
            key = ModelKeys(model).prefix + "timings"
            pipe = self.store.client.pipeline(transaction=False)
            pipe.lpush(key, f"{waited:.6f} {held:.6f} {n}")
            pipe.ltrim(key, 0, 99_999)
            pipe.execute()


def _dead(job: Job, exc: BaseException) -> bytes:
    ev = job.event
    return dead_letter_entry(
        job.task_id, exc, model=ev.model, event_id=ev.event_id, action_type=ev.action_type
    )
