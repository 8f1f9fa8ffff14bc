"""The engine: the spec's ``trainStep`` pipeline for a batch of events of one model.

1. Validation    the model must be initialised (else the no-op ``skipped`` result)
2. Preprocessing ``features.featurize_many``, before the lock
3. Target        ``targets.make_targets``, before the lock
4. Forward       ``kernel.per_event_steps`` (numba) / ``mlp.minibatch_step``
5. Backward      the same calls: gradient, clipping, refused if non-finite
6. Bookkeeping   ``store.Store.commit``: step, version, counters, loss, history, event markers,
                 the online evaluation (``evaluation.advance``, each event scored before its update)
7. Cleanup       the same commit trims history and dead letters; markers and results expire

Everything that needs no shared state is ``prepare``d before the lock (features, targets,
in-batch copies, the fixed part of each history entry). Under the model's lock run only the
checkpoint read (its version and the event markers), the SGD steps and the commit, fenced by the
checkpoint version, as named phases over one ``BatchPlan``: ``plan`` (duplicates, refusals,
copies), ``step`` (the SGD kernel), ``settle_copies``, ``evaluate``, the guard's check
(``guard.worst_window`` and ``guard.tripped`` over every window of the guard's width that ends in
the batch: a trip refuses the batch and restores the best recent snapshot instead of
committing), ``history`` and the commit. The trained events' results are made after the lock is
given back.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import orjson

from producer.errors import (
    GuardTrippedError,
    ItrainError,
    LockTimeoutError,
    ModelNotInitialisedError,
    NonFiniteUpdateError,
    TargetError,
)
from producer.events import InteractionData
from producer.keys import LOCK_BUCKETS, ModelKeys
from producer.settings import Settings
from worker.engine.checkpoint import Checkpoint
from worker.engine.evaluation import EvalState, EvalUpdate, advance
from worker.engine.features import featurize, featurize_many
from worker.engine.guard import Reference, Window, tripped
from worker.engine.kernel import per_event_steps
from worker.engine.mlp import forward, minibatch_step, sigmoid
from worker.engine.targets import make_targets
from worker.store.lock import ModelLock
from worker.store.model_store import CommitResult, Store
from worker.store.results import Outcome, failure_payload
from worker.store.snapshots import due, take_snapshot

__all__ = [
    "BatchPlan",
    "Job",
    "Prepared",
    "Trainer",
    "dead_letter_entry",
    "evaluate",
    "history",
    "plan",
    "prepare",
    "settle_copies",
    "step",
]

logger = logging.getLogger("itrain.trainer")


class Job(NamedTuple):
    """One valid event and the id of the result it owes (a tuple: made for every event, and a
    frozen dataclass costs several times as much to make)."""

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


@dataclass(slots=True)
class Prepared:
    """What a batch of one model's jobs needs that no shared state decides, computed before the
    lock: features, targets, in-batch copies, action names and the fixed part of each history
    entry. Indexes are positions in ``jobs``."""

    jobs: list[Job]
    #: The features of every job, one row each.
    X: npt.NDArray[np.float64]
    #: The output count the targets were made for (the model's, as last seen by this process).
    outputs: int
    #: The target of every job, one row each (NaN for a job in ``target_errors``).
    Y: npt.NDArray[np.float64]
    #: Why a job has no target (no label and no mapping, or a label of the wrong length).
    target_errors: dict[int, TargetError]
    #: (index, index of the first copy) of each later copy of an event id in this batch.
    copies: list[tuple[int, int]]
    event_ids: list[str]
    actions: list[str]
    #: Each job's history entry without its braces, step, loss and time (filled in under the lock).
    history_parts: list[bytes]


def prepare(
    jobs: list[Job], outputs: int, targets: dict[str, float], X: npt.NDArray[np.float64] | None = None
) -> Prepared:
    """Everything about ``jobs`` that needs no checkpoint but its output count (pure)."""
    events = [j.event for j in jobs]
    X = featurize_many(events) if X is None else X
    Y, errors = make_targets(events, outputs, targets)
    event_ids = [e.event_id for e in events]
    copies: list[tuple[int, int]] = []
    if len(set(event_ids)) != len(event_ids):
        first_copy: dict[str, int] = {}
        for i, event_id in enumerate(event_ids):
            j = first_copy.setdefault(event_id, i)
            if j != i:
                copies.append((i, j))
    features, rows = X.tolist(), Y.tolist()
    parts = [
        b""
        if i in errors
        else orjson.dumps(
            {
                "event_id": e.event_id,
                "action_type": e.action_type,
                "features": features[i],
                "target": rows[i],
                "event_time": e.timestamp.timestamp(),
            }
        )[1:-1]
        for i, e in enumerate(events)
    ]
    return Prepared(jobs, X, outputs, Y, errors, copies, event_ids, [e.action_type for e in events], parts)


@dataclass(slots=True)
class BatchPlan:
    """One model's batch inside the critical section, filled in phase by phase.

    ``plan`` decides what each job needs (already done, refused, trained, or a copy of an event
    met earlier in the batch); ``step`` trains; ``settle_copies`` answers the copies; the commit
    writes ``theta`` and ``dead``; the trained jobs are answered after the lock is given back.
    Indexes are positions in ``jobs``.
    """

    model: str
    prep: Prepared
    #: The checkpoint read under the lock; the commit is fenced on it.
    base: Checkpoint
    #: The jobs to train, in arrival order: the first copy of each event id not yet trained.
    train: list[int] = field(default_factory=list)
    #: (index, index of the first copy in this batch) of each later copy of an event id.
    copies: list[tuple[int, int]] = field(default_factory=list)
    #: (index, loss) of each job ``step`` trained, in training order.
    trained: list[tuple[int, float]] = field(default_factory=list)
    #: The predictions (sigmoid outputs) of the trained jobs before their update, one row each.
    P: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty((0, 1)))
    #: The weights after ``step``; the cached checkpoint's own array is never changed in place.
    theta: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    #: Each job's outcome once known.
    outcomes: list[Outcome | None] = field(default_factory=list)
    #: Dead letters written with the commit.
    dead: list[bytes] = field(default_factory=list)
    #: What the commit answered (None until it landed), and the running loss it wrote.
    committed: CommitResult | None = None
    ema: float | None = None

    @property
    def jobs(self) -> list[Job]:
        return self.prep.jobs

    @property
    def X(self) -> npt.NDArray[np.float64]:
        return self.prep.X

    def fail(self, i: int, exc: BaseException) -> None:
        """Job ``i`` ends as FAILURE with a dead letter."""
        job = self.jobs[i]
        self.outcomes[i] = Outcome.failure(job.task_id, exc, event_id=job.event.event_id)
        self.dead.append(_dead(job, exc))

    def loss_ema(self, alpha: float) -> float | None:
        """The checkpoint's running loss after the trained events, in training order."""
        ema = self.base.loss_ema
        for _, loss in self.trained:
            ema = loss if ema is None else alpha * loss + (1.0 - alpha) * ema
        return ema

    def all_trained(self) -> bool:
        """Whether every job trained (the common case: fast paths take the prepared lists)."""
        return len(self.trained) == len(self.prep.jobs)

    def results(self) -> list[Outcome]:
        return [o for o in self.outcomes if o is not None]


def plan(
    model: str, prep: Prepared, base: Checkpoint, done: Sequence[bool], targets: dict[str, float]
) -> BatchPlan:
    """Sort the jobs: events already in the weights are duplicates, events without a target
    fail, later copies of an event id wait for their first copy, the rest train."""
    if prep.outputs != base.config.outputs:  # prepared for another output count: make them again
        prep = prepare(prep.jobs, base.config.outputs, targets, prep.X)
    n = len(prep.jobs)
    batch = BatchPlan(model, prep, base, outcomes=[None] * n)
    if not (prep.target_errors or prep.copies or any(done)):
        batch.train = list(range(n))
        return batch
    copy_of = dict(prep.copies)
    for i, job in enumerate(prep.jobs):
        if done[i]:
            batch.outcomes[i] = Outcome.duplicate(job.task_id, model, prep.event_ids[i])
        elif i in prep.target_errors:
            batch.fail(i, prep.target_errors[i])
        elif i in copy_of:
            batch.copies.append((i, copy_of[i]))  # answered once the first one is
        else:
            batch.train.append(i)
    return batch


def step(batch: BatchPlan) -> None:
    """The SGD kernel over the jobs to train: one exact step per event (``per_event``) or one
    vectorised step for all (``minibatch``). A non-finite update fails its event (per event) or
    the whole step (minibatch), and never reaches ``theta``."""
    cfg = batch.base.config
    theta = batch.base.theta.copy()  # the cached copy stays as committed if the commit is refused
    prep, train = batch.prep, batch.train
    if not train:
        batch.theta = theta
        return
    every = len(train) == len(prep.jobs)
    X = prep.X if every else prep.X[train]
    Y = prep.Y if every else prep.Y[train]
    if cfg.mode == "per_event":
        P = np.empty((len(train), cfg.outputs))
        steps = per_event_steps(theta, cfg.shape, X, Y, cfg.lr, cfg.clip, P)
        kept: list[int] = []
        for k, (i, loss) in enumerate(zip(train, steps, strict=True)):
            if isinstance(loss, NonFiniteUpdateError):
                batch.fail(i, loss)
            else:
                batch.trained.append((i, loss))
                kept.append(k)
        batch.P = P if len(kept) == len(train) else P[kept]
    else:
        try:
            P = np.empty((len(train), cfg.outputs))
            theta, losses = minibatch_step(theta, cfg.shape, X, Y, cfg.lr, cfg.clip, P)
            batch.trained = list(zip(train, losses.tolist(), strict=True))
            batch.P = P
        except NonFiniteUpdateError as exc:
            for i in train:
                batch.fail(i, exc)
    batch.theta = theta


def settle_copies(batch: BatchPlan) -> None:
    """A copy of an event met earlier in this batch: refused like its first copy, else a
    duplicate. Decided before the commit so its dead letter goes in the same write."""
    jobs = batch.jobs
    for i, j in batch.copies:
        original = batch.outcomes[j]
        event_id = jobs[i].event.event_id
        if original is not None and original.status == "FAILURE":
            batch.outcomes[i] = Outcome(jobs[i].task_id, "FAILURE", original.result, event_id=event_id)
            batch.dead.append(_dead(jobs[i], NonFiniteUpdateError(original.result["exc_message"][0])))
        else:
            batch.outcomes[i] = Outcome.duplicate(jobs[i].task_id, batch.model, event_id)


def evaluate(batch: BatchPlan, eval_window: int) -> EvalUpdate | None:
    """The online evaluation after the trained events (``None`` when none trained): each one's
    prediction and loss from before its own update, into the window and the sums since creation."""
    if not batch.trained:
        return None
    every = batch.all_trained()
    idx = [i for i, _ in batch.trained]
    prep, base = batch.prep, batch.base
    losses = np.fromiter((loss for _, loss in batch.trained), np.float64, len(idx))
    state = base.eval if base.eval is not None else EvalState(eval_window)
    return advance(
        state,
        batch.P,
        prep.Y if every else prep.Y[idx],
        losses,
        prep.actions if every else [prep.actions[i] for i in idx],
        base.guard.window if base.guard else 0,
    )


def history(batch: BatchPlan, history_max: int, now: float) -> list[bytes]:
    """Training-history entries, oldest first, for the last ``history_max`` trained events only
    (the list keeps no more). Each is its prepared part with the step, loss and time added."""
    keep = batch.trained[-history_max:]
    # The step of trained event k is base.step + k + 1: the commit is fenced on base.
    first = batch.base.step + len(batch.trained) - len(keep) + 1
    parts = batch.prep.history_parts
    dumps = orjson.dumps
    tail = b',"trained_at":' + dumps(now) + b"}"
    return [
        b'{"step":%d,"loss":%b,%b%b' % (first + k, dumps(loss), parts[i], tail)
        for k, (i, loss) in enumerate(keep)
    ]


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
        #: Each model's output count as last read: targets are made before the lock for it.
        self._outputs: dict[str, int] = {}

    # -- training -----------------------------------------------------------------------------

    def train(self, jobs: Sequence[Job]) -> list[Outcome]:
        """One outcome per job, in the same order; events of a model train in arrival order."""
        by_model: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(job.event.model, []).append(i)
        outcomes: list[Outcome | None] = [None] * len(jobs)
        # An exception escapes: a Redis fault sends the messages back to the queue, anything
        # else is isolated to the event that raises it by ``run_messages`` (it retries in halves).
        for model, idxs in by_model.items():
            done = self._train_model(model, [jobs[i] for i in idxs])
            for i, outcome in zip(idxs, done, strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _train_model(self, model: str, jobs: list[Job]) -> list[Outcome]:
        # Outside the lock: all that needs no shared state (the output count is the one this
        # process saw last; ``plan`` makes the targets again in the rare case it changed).
        prep = prepare(jobs, self._outputs.get(model, 1), self.settings.targets)
        lock = ModelLock(self.store.client, model, self.settings)
        attempts = self.settings.commit_retries
        for attempt in range(attempts):
            try:
                lock.acquire()
            except LockTimeoutError as exc:
                return self._fail_all(model, jobs, exc)
            try:
                found = self._critical_section(model, prep)
            finally:
                held = lock.release()
            if not isinstance(found, list):  # (a model that does not exist gets no keys at all)
                self._record_timing(model, lock.waited, held, len(jobs))
            if isinstance(found, BatchPlan):
                return self._answer(found)
            if found is not None:
                return found
            # Fenced out: another worker committed first (our lock had expired). Retry on its weights.
            self._cache.pop(model, None)
            logger.warning(
                "model=%s commit refused (attempt %d/%d); retrying on fresh weights",
                model,
                attempt + 1,
                attempts,
            )
        return self._fail_all(model, jobs, ItrainError(f"commit refused {attempts} times in a row"))

    def _critical_section(self, model: str, prep: Prepared) -> BatchPlan | list[Outcome] | None:
        """Read, plan, step, settle copies, commit: the committed batch, the answers of a model
        that is not initialised, or ``None`` when the fenced commit was refused."""
        read = self.store.read(model, self._cache.get(model), prep.event_ids)
        if read.checkpoint is None:
            self._cache.pop(model, None)
            return [self._skipped(j) for j in prep.jobs]
        self._outputs[model] = read.checkpoint.config.outputs
        batch = plan(model, prep, read.checkpoint, read.done, self.settings.targets)
        if batch.base.paused:
            return self._refuse_paused(batch)
        step(batch)
        settle_copies(batch)
        update = evaluate(batch, self.settings.eval_window)
        # Every window of the guard's width that ends in this batch, not only the last one: a
        # large batch would otherwise learn a bad stream before its last events are looked at.
        ref, worst = read.guard_ref, update.worst if update is not None else None
        if worst is not None and ref is not None and tripped(batch.base.guard, worst.loss, ref):
            return self._trip(batch, ref, worst)
        if not self._commit(batch, update):
            return None
        # Under the lock (once per ITRAIN_SNAPSHOT_EVERY steps): a guard's trip, which reads the
        # reference snapshot under the lock too, never races a snapshot that replaces it.
        self._maybe_snapshot(batch)
        return batch

    def _commit(self, batch: BatchPlan, update: EvalUpdate | None) -> bool:
        """The fenced commit of what ``step`` trained, with its history, counters, dead letters and
        online evaluation. False (nothing written) when the checkpoint moved on."""
        base, trained, prep = batch.base, batch.trained, batch.prep
        ema = batch.loss_ema(self.settings.loss_ema_alpha)
        every = batch.all_trained()
        result = self.store.commit(
            batch.model,
            expected=base,
            params=batch.theta.tobytes() if trained else b"",
            event_ids=prep.event_ids if every else [prep.event_ids[i] for i, _ in trained],
            loss_last=trained[-1][1] if trained else 0.0,
            loss_ema=ema if ema is not None else 0.0,
            actions=dict(Counter(prep.actions if every else [prep.actions[i] for i, _ in trained])),
            history=history(batch, self.settings.history_max, time.time()),
            dead=batch.dead,
            evaluation=update,
        )
        if not result.ok:
            return False
        batch.committed, batch.ema = result, ema
        # Nothing trained means nothing written: the checkpoint (and its tag) is unchanged.
        self._cache[batch.model] = (
            Checkpoint(
                config=base.config,
                theta=batch.theta,
                version=result.version,
                step=base.step + len(trained),
                loss_ema=ema,
                loss_last=trained[-1][1],
                cid=result.cid,
                gen=base.gen,
                eval=update.state if update is not None else base.eval,
                guard=base.guard,
            )
            if trained
            else base
        )
        return True

    def _answer(self, batch: BatchPlan) -> list[Outcome]:
        """Every job's outcome once the commit landed: the trained ones are made here, after the
        lock is given back."""
        result = batch.committed
        assert result is not None
        jobs, model, outcomes = batch.jobs, batch.model, batch.outcomes
        version, first, log_every = result.version, result.first_step + 1, self.settings.log_every
        event_ids = batch.prep.event_ids
        for k, (i, loss) in enumerate(batch.trained):
            position = first + k
            event_id = event_ids[i]
            outcomes[i] = Outcome(
                jobs[i].task_id,
                "SUCCESS",
                {
                    "status": "trained",
                    "model": model,
                    "event_id": event_id,
                    "step": position,
                    "version": version,
                    "loss": loss,
                },
                event_id=event_id,
            )
            if position % log_every == 0:
                logger.info(
                    "model=%s step=%d version=%d loss=%.6f loss_ema=%.6f",
                    model,
                    position,
                    version,
                    loss,
                    batch.ema,
                )
        return batch.results()

    # -- the guard ----------------------------------------------------------------------------

    def _refuse_paused(self, batch: BatchPlan) -> list[Outcome]:
        """A paused model trains nothing: its events fail with ``GuardTrippedError`` and are
        dead-lettered (duplicates still answer ``duplicate``)."""
        model = batch.model
        exc = GuardTrippedError(
            f"model {model!r} is paused: its guard tripped; run `itrain resume --model {model}`, "
            "then send the refused events again"
        )
        for i in [*batch.train, *(i for i, _ in batch.copies)]:
            batch.fail(i, exc)
        self.store.dead_letter(model, batch.dead)
        return batch.results()

    def _trip(self, batch: BatchPlan, ref: Reference, worst: Window) -> list[Outcome] | None:
        """The guard tripped on this batch: refuse its events, restore the best recent snapshot
        and pause the model, in one write fenced like a commit (``None`` when the checkpoint moved
        on: the batch is tried again on the new one)."""
        model, guard = batch.model, batch.base.guard
        assert guard is not None
        where = f"ending at event {worst.end + 1} of the {len(batch.trained)} this batch scored"
        exc = GuardTrippedError(
            f"guard of model {model!r} tripped: log loss {worst.loss:.6g} over {guard.window} consecutive "
            f"events ({where}) exceeds {guard.ratio:g} x {ref.loss:.6g} (snapshot {ref.version}); "
            f"training paused and weights rolled back; run `itrain resume --model {model}`, then send "
            "the refused events again"
        )
        trained = {i for i, _ in batch.trained}
        for i, _ in batch.trained:
            batch.fail(i, exc)
        for i, j in batch.copies:
            if j in trained:  # answered ``duplicate`` of an event now refused: refused too
                batch.fail(i, exc)
        done = self.store.restore(model, ref.version, trip=True, expected=batch.base.tag, dead=batch.dead)
        self._cache.pop(model, None)
        if not done.ok:
            return None if done.reason == "moved" else [self._skipped(j) for j in batch.jobs]
        logger.error(
            "model=%s guard tripped: loss %.6g over %d events (%s) > %g x %.6g; %s as version %d, "
            "training paused",
            model,
            worst.loss,
            guard.window,
            where,
            guard.ratio,
            ref.loss,
            f"rolled back to snapshot {ref.version}"
            if done.restored
            else f"snapshot {ref.version} is gone, weights kept",
            done.version,
        )
        return batch.results()

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
        return [
            Outcome(j.task_id, "FAILURE", failure_payload(exc), keep_existing=True, event_id=j.event.event_id)
            for j in jobs
        ]

    def _maybe_snapshot(self, batch: BatchPlan) -> None:
        """A snapshot of the checkpoint when this commit crossed a multiple of
        ``ITRAIN_SNAPSHOT_EVERY`` steps (one atomic script, run under the lock)."""
        before, after = batch.base.step, batch.base.step + len(batch.trained)
        if due(before, after, self.settings.snapshot_every):
            version = take_snapshot(self.store.client, batch.model, self.settings.snapshot_keep)
            logger.info("model=%s snapshot of version %s (step %d)", batch.model, version, after)

    def _record_timing(self, model: str, waited: float, held: float, n: int) -> None:
        """Lock wait and hold of this critical section into the model's histograms (``itrain
        exporter``), and with ``ITRAIN_RECORD_TIMINGS`` into the bench's list: one round trip."""
        keys = ModelKeys(model)
        pipe = self.store.client.pipeline(transaction=False)
        for prefix, seconds in (("w", waited), ("h", held)):
            pipe.hincrby(keys.lock_stats, f"{prefix}:{bisect_left(LOCK_BUCKETS, seconds)}", 1)
            pipe.hincrbyfloat(keys.lock_stats, f"{prefix}:sum", seconds)
        if self.settings.record_timings:
            key = keys.prefix + "timings"
            pipe.lpush(key, f"{waited:.6f} {held:.6f} {n}")
            pipe.ltrim(key, 0, 99_999)
        pipe.execute()


def _dead(job: Job, exc: BaseException) -> bytes:
    ev = job.event
    return dead_letter_entry(
        job.task_id, exc, model=ev.model, event_id=ev.event_id, action_type=ev.action_type
    )
