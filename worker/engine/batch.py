"""One model's batch, phase by phase: the pure part of the spec's ``trainStep`` pipeline.

``prepare`` runs before the lock (features, targets, in-batch copies, the fixed part of each
history entry). Under the lock, the training loop (``worker.training.trainer``) reads the
checkpoint and then runs these phases over one ``BatchPlan``: ``plan`` (duplicates, refusals,
copies), ``step`` (the SGD kernel), ``settle_copies``, ``evaluate`` (the online evaluation and
the guard's worst window) and ``history``. Nothing here reads or writes Redis: each phase is a
function of the plan and the checkpoint, testable without a server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import orjson

from producer.errors import NonFiniteUpdateError, TargetError
from producer.events import InteractionData
from worker.engine.checkpoint import Checkpoint
from worker.engine.evaluation import EvalState, EvalUpdate, advance
from worker.engine.features import featurize_many
from worker.engine.kernel import per_event_steps
from worker.engine.latency import ENQUEUE_TO_COMMIT, FRESHNESS, histogram_fields
from worker.engine.mlp import minibatch_step
from worker.engine.targets import make_targets
from worker.outcome import Outcome, dead_letter_entry

__all__ = [
    "BatchPlan",
    "Job",
    "Prepared",
    "evaluate",
    "history",
    "job_dead_letter",
    "latencies",
    "plan",
    "prepare",
    "settle_copies",
    "step",
]


class Job(NamedTuple):
    """One valid event and the id of the result it owes (a tuple: made for every event, and a
    frozen dataclass costs several times as much to make)."""

    task_id: str
    event: InteractionData
    #: When its message was enqueued (unix seconds, ``producer.enqueue_time``); None: unknown,
    #: counted from when ``prepare`` saw it.
    enqueued: float | None = None


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
    #: Each job's enqueue time and its event's timestamp (unix seconds): its latency histograms.
    enqueued: npt.NDArray[np.float64]
    event_times: npt.NDArray[np.float64]


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
    times = [e.timestamp.timestamp() for e in events]
    now = time.time()
    enqueued = np.fromiter((now if j.enqueued is None else j.enqueued for j in jobs), np.float64, len(jobs))
    parts = [
        b""
        if i in errors
        else orjson.dumps(
            {
                "event_id": e.event_id,
                "action_type": e.action_type,
                "features": features[i],
                "target": rows[i],
                "event_time": times[i],
            }
        )[1:-1]
        for i, e in enumerate(events)
    ]
    actions = [e.action_type for e in events]
    return Prepared(
        jobs,
        X,
        outputs,
        Y,
        errors,
        copies,
        event_ids,
        actions,
        parts,
        enqueued,
        np.asarray(times, np.float64),
    )


@dataclass(slots=True)
class BatchPlan:
    """One model's batch inside the critical section, filled in phase by phase.

    ``plan`` decides what each job needs (already done, refused, trained, or a copy of an event
    met earlier in the batch); ``step`` trains; ``settle_copies`` answers the copies; the training
    loop (``worker.training``) commits ``theta`` and ``dead`` and answers the trained jobs after
    the lock is given back.
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
        self.dead.append(job_dead_letter(job, exc))

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
            batch.dead.append(
                job_dead_letter(jobs[i], NonFiniteUpdateError(original.result["exc_message"][0]))
            )
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


def latencies(batch: BatchPlan, now: float) -> list[tuple[str, int | float]]:
    """What the trained events add to the model's latency histograms when committed at ``now``
    (``worker.engine.latency``): enqueue to commit, and the events' timestamps to commit."""
    if not batch.trained:
        return []
    prep = batch.prep
    if batch.all_trained():
        enqueued, stamped = prep.enqueued, prep.event_times
    else:
        idx = [i for i, _ in batch.trained]
        enqueued, stamped = prep.enqueued[idx], prep.event_times[idx]
    return [*histogram_fields(ENQUEUE_TO_COMMIT, now - enqueued), *histogram_fields(FRESHNESS, now - stamped)]


def job_dead_letter(job: Job, exc: BaseException) -> bytes:
    """The dead-letter record of a job that failed with ``exc``."""
    ev = job.event
    return dead_letter_entry(
        job.task_id, exc, model=ev.model, event_id=ev.event_id, action_type=ev.action_type
    )
