"""The training loop under a model's lock: take the lock, read the checkpoint, run the engine,
commit (or trip the guard), answer.

The spec's ``trainStep`` pipeline for a batch of events of one model:

1. Validation    the model must be initialised (else the no-op ``skipped`` result)
2. Preprocessing ``engine.features.featurize_many``, before the lock (``engine.batch.prepare``)
3. Target        ``engine.targets.make_targets``, before the lock
4. Forward       ``engine.kernel.per_event_steps`` (numba) / ``engine.mlp.minibatch_step``
5. Backward      the same calls: gradient, clipping, refused if non-finite
6. Bookkeeping   ``store.Store.commit``: step, version, counters, loss, history, event markers,
                 the online evaluation (``engine.evaluation.advance``, each event scored before
                 its update)
7. Cleanup       the same commit trims history and dead letters; markers and results expire

The computation is the engine's (``worker.engine.batch``: pure phases over one ``BatchPlan``);
this module does the I/O around it. Under the lock run only the checkpoint read (its version and
the event markers), the phases ``plan``, ``step``, ``settle_copies``, ``evaluate``, the guard's
check (``engine.guard.tripped`` on the worst window of the guard's width that ends in the batch:
a trip refuses the batch and restores the best recent snapshot instead of committing),
``history`` and the commit, fenced by the checkpoint version.

A batch's results can ride in its commit's round trip (``train(..., results=)``): a commit fenced
on the version read lands as that version + 1, from the step read on, so every result is known
before it is sent, but for whether it lands. They go behind the commit and the lock's release,
written by ``lua/write_results.lua`` only if the checkpoint then holds this commit's id
(``results.queue_guarded_results``); when it does not (the commit was refused, or another landed
in between), the caller writes them as ever. A batch costs two round trips so: lock and read,
commit with its release and results. ``run_messages`` asks for it in a worker (``ResultsAlong``:
which results ride, a ``train_many`` chunk's one result only when this commit answers all of its
events).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from redis.client import Pipeline

from producer.errors import GuardTrippedError, ItrainError, LockTimeoutError, ModelNotInitialisedError
from producer.events import InteractionData
from producer.keys import LOCK_BUCKETS, ModelKeys
from producer.settings import Settings
from worker.engine.batch import (
    BatchPlan,
    Job,
    Prepared,
    evaluate,
    history,
    job_dead_letter,
    latencies,
    plan,
    prepare,
    settle_copies,
    step,
)
from worker.engine.checkpoint import Checkpoint
from worker.engine.evaluation import EvalUpdate
from worker.engine.features import featurize
from worker.engine.guard import Reference, Window, tripped
from worker.engine.mlp import forward, sigmoid
from worker.outcome import Outcome, failure_payload
from worker.store.lock import ModelLock
from worker.store.markers import own_trained
from worker.store.model_store import CommitResult, ReadResult, Store, new_cid
from worker.store.results import ChunkResult, guarded_written, queue_guarded_results
from worker.store.snapshots import due, take_snapshot

__all__ = ["Committed", "Compose", "ResultsAlong", "Trainer"]

logger = logging.getLogger("itrain.trainer")


#: Of a batch's jobs and their outcomes, the results to write in the commit's round trip and the
#: outcomes they answer (``ResultsAlong.compose``).
Compose = Callable[[Sequence[Job], list[Outcome]], tuple[list[Outcome | ChunkResult], list[Outcome]]]


@dataclass(frozen=True, slots=True)
class ResultsAlong:
    """Results that ride in a commit's round trip: their expiry in seconds, and which to write
    there (``compose``; by default every outcome, a result each). An outcome written so says so
    (``Outcome.stored``); the others are the caller's to write after the commit."""

    expires: int
    compose: Compose | None = None

    def results(
        self, jobs: Sequence[Job], outcomes: list[Outcome]
    ) -> tuple[list[Outcome | ChunkResult], list[Outcome]]:
        if self.compose is None:
            return list(outcomes), outcomes
        return self.compose(jobs, outcomes)


@dataclass(frozen=True, slots=True)
class Committed:
    """A batch whose fenced commit landed: what the commit answered and the running loss it wrote."""

    batch: BatchPlan
    result: CommitResult
    ema: float | None
    #: The value of each marker the read found, by job index (``worker.store.markers``).
    marks: dict[int, bytes] = field(default_factory=dict)
    #: Every job's outcome, made before the commit when the results rode in its round trip.
    answered: list[Outcome] | None = None


class Trainer:
    """Trains batches of events against the shared checkpoints; one per worker process.

    Keeps each model's last committed checkpoint in memory, so a worker that committed the
    previous batch reads no weights at all for the next one (the read script answers with the
    version only).
    """

    def __init__(self, store: Store, settings: Settings, *, defer_timings: bool = False) -> None:
        self.store = store
        self.settings = settings
        #: Keep each critical section's lock timings for ``queue_timings`` (the caller sends them
        #: in a round trip it makes anyway) instead of writing them at once.
        self.defer_timings = defer_timings
        self._timings: list[tuple[str, float, float, int]] = []
        self._cache: dict[str, Checkpoint] = {}
        #: Each model's output count as last read: targets are made before the lock for it.
        self._outputs: dict[str, int] = {}

    # -- training -----------------------------------------------------------------------------

    def train(self, jobs: Sequence[Job], *, results: int | ResultsAlong | None = None) -> list[Outcome]:
        """One outcome per job, in the same order; events of a model train in arrival order.

        With ``results`` (their expiry in seconds, or a ``ResultsAlong``), each batch's results
        ride in its commit's round trip, written only if the commit landed
        (``results.queue_guarded_results``); the outcomes so written say so (``Outcome.stored``),
        the others are the caller's to write. The caller asks only where the results go to the
        store's Redis and may be read before the store's replicas hold the commit: a replica
        barrier, if any, comes after them (``Runtime.results_with_commit`` asks for none then)."""
        along = ResultsAlong(results) if isinstance(results, int) else results
        by_model: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(job.event.model, []).append(i)
        outcomes: list[Outcome | None] = [None] * len(jobs)
        # An exception escapes: a Redis fault sends the messages back to the queue, anything
        # else is isolated to the event that raises it by ``run_messages`` (it retries in halves).
        for model, idxs in by_model.items():
            done = self._train_model(model, [jobs[i] for i in idxs], along)
            for i, outcome in zip(idxs, done, strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _train_model(self, model: str, jobs: list[Job], along: ResultsAlong | None) -> list[Outcome]:
        # Outside the lock: all that needs no shared state (the output count is the one this
        # process saw last; ``plan`` makes the targets again in the rare case it changed).
        prep = prepare(jobs, self._outputs.get(model, 1), self.settings.targets)
        lock = ModelLock(self.store.client, model, self.settings)
        attempts = self.settings.commit_retries
        for attempt in range(attempts):
            try:
                read = self._lock_and_read(lock, model, prep)
            except LockTimeoutError as exc:
                return self._fail_all(model, jobs, exc)
            try:
                found = self._critical_section(model, prep, read, lock, along)
            finally:
                # Given back here unless the commit's round trip already did.
                held = lock.release()
            if not isinstance(found, list):  # (a model that does not exist gets no keys at all)
                self._record_timing(model, lock.waited, held, len(jobs))
            if isinstance(found, Committed):
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

    def _lock_and_read(self, lock: ModelLock, model: str, prep: Prepared) -> ReadResult:
        """Take the lock and read the checkpoint in one round trip: every try at the lock rides
        in front of a read, so a worker that waited for another's release reads in the round
        trip that takes the lock, not one after it (a try that finds the lock taken reads the
        checkpoint's fields and markers for nothing; its weights only when the cached ones are
        stale, which they are not while the holder has not committed)."""
        try:
            return lock.wait_for(
                lambda: self.store.read(model, self._cache.get(model), prep.event_ids, lock=lock)
            )
        except BaseException:
            if lock.owned:  # the read failed under the lock: give it back, then let the fault out
                with contextlib.suppress(redis.RedisError):
                    lock.release()
            raise

    def _critical_section(
        self, model: str, prep: Prepared, read: ReadResult, lock: ModelLock, along: ResultsAlong | None
    ) -> Committed | list[Outcome] | None:
        """Plan, step, settle copies, commit, on what was read under the lock: the committed
        batch, the answers of a model that is not initialised, or ``None`` when the fenced
        commit was refused."""
        if read.checkpoint is None:
            self._cache.pop(model, None)
            return [self._skipped(j) for j in prep.jobs]
        self._outputs[model] = read.checkpoint.config.outputs
        batch = plan(model, prep, read.checkpoint, read.done, self.settings.targets)
        if batch.base.paused:
            return self._refuse_paused(batch, read.marks)
        step(batch)
        settle_copies(batch)
        update = evaluate(batch, self.settings.eval_window)
        # Every window of the guard's width that ends in this batch, not only the last one: a
        # large batch would otherwise learn a bad stream before its last events are looked at.
        ref, worst = read.guard_ref, update.worst if update is not None else None
        if worst is not None and ref is not None and tripped(batch.base.guard, worst.loss, ref):
            return self._trip(batch, ref, worst, read.marks)
        # The lock goes back in the commit's round trip, unless a snapshot is due after it (a
        # snapshot is taken under the lock).
        snapshot = due(batch.base.step, batch.base.step + len(batch.trained), self.settings.snapshot_every)
        # A batch with an event trained by an earlier delivery (``marks``) writes its results
        # after the commit, as ever: they are made from the markers.
        committed = self._commit(batch, update, None if snapshot else lock, None if read.marks else along)
        if committed is None:
            return None
        if read.marks:
            committed = replace(committed, marks=read.marks)
        # Under the lock (once per ITRAIN_SNAPSHOT_EVERY steps): a guard's trip, which reads the
        # reference snapshot under the lock too, never races a snapshot that replaces it.
        self._maybe_snapshot(batch)
        return committed

    def _commit(
        self,
        batch: BatchPlan,
        update: EvalUpdate | None,
        release: ModelLock | None,
        along: ResultsAlong | None,
    ) -> Committed | None:
        """The fenced commit of what ``step`` trained, with its history, counters, dead letters and
        online evaluation, ``release`` given back in the same round trip and, with ``results``,
        the batch's results behind them (``train``). ``None`` (nothing written) when the
        checkpoint moved on."""
        base, trained, prep = batch.base, batch.trained, batch.prep
        ema = batch.loss_ema(self.settings.loss_ema_alpha)
        every = batch.all_trained()
        now = time.time()
        # The commit's outcome is known before it is sent, but for whether it lands: fenced on
        # the version read, it writes version + 1 from step ``base.step`` on (nothing at all when
        # no event trained), and under a commit id of its own, which the results' guard checks.
        cid = new_cid() if trained else base.cid
        answered: list[Outcome] | None = None
        covered: list[Outcome] = []
        after = None
        if along is not None and cid:  # (an empty guard would be none: never sent)
            version = base.version + 1 if trained else base.version
            answered = self._outcomes(batch, version, base.step + 1)
            written, covered = along.results(batch.jobs, answered)
            if written:
                ckpt_key = ModelKeys(batch.model).ckpt
                after = functools.partial(self._queue_results, written, along.expires, ckpt_key, cid)
        result = self.store.commit(
            batch.model,
            expected=base,
            params=batch.theta.tobytes() if trained else b"",
            event_ids=prep.event_ids if every else [prep.event_ids[i] for i, _ in trained],
            result_ids=[j.task_id for j in prep.jobs]
            if every
            else [prep.jobs[i].task_id for i, _ in trained],
            loss_last=trained[-1][1] if trained else 0.0,
            loss_ema=ema if ema is not None else 0.0,
            actions=dict(Counter(prep.actions if every else [prep.actions[i] for i, _ in trained])),
            history=history(batch, self.settings.history_max, now),
            dead=batch.dead,
            evaluation=update,
            latency=latencies(batch, now),
            release=release,
            cid=cid,
            after=after,
        )
        if not result.ok:
            return None
        if after is not None and result.after and guarded_written(result.after[0]) is not None:
            for outcome in covered:
                outcome.stored = True
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
        return Committed(batch, result, ema, answered=answered)

    def _queue_results(
        self, outcomes: list[Outcome | ChunkResult], expires: int, ckpt_key: str, cid: str, pipe: Pipeline
    ) -> None:
        """Behind the commit: the batch's results, guarded by its commit id, then the lock
        timings kept so far (they ride in front of the results otherwise: ``queue_timings``)."""
        queue_guarded_results(pipe, outcomes, expires, ckpt_key, cid)
        if self.defer_timings:
            self.queue_timings(pipe)

    def _answer(self, committed: Committed) -> list[Outcome]:
        """Every job's outcome once the commit landed (made before it, when the results rode in
        its round trip); every ``ITRAIN_LOG_EVERY`` steps a log line."""
        batch, result = committed.batch, committed.result
        first, log_every = result.first_step + 1, self.settings.log_every
        outcomes = committed.answered
        if outcomes is None:
            outcomes = self._outcomes(batch, result.version, first)
        for k, (_, loss) in enumerate(batch.trained):
            if (first + k) % log_every == 0:
                logger.info(
                    "model=%s step=%d version=%d loss=%.6f loss_ema=%.6f",
                    batch.model,
                    first + k,
                    result.version,
                    loss,
                    committed.ema,
                )
        if committed.marks:
            self._answer_own_marks(batch, committed.marks, result.version)
            return batch.results()
        return outcomes

    @staticmethod
    def _outcomes(batch: BatchPlan, version: int, first: int) -> list[Outcome]:
        """Every job's outcome for a commit of ``version`` whose first event is step ``first``."""
        jobs, model, outcomes = batch.jobs, batch.model, batch.outcomes
        event_ids = batch.prep.event_ids
        for k, (i, loss) in enumerate(batch.trained):
            event_id = event_ids[i]
            outcomes[i] = Outcome(
                jobs[i].task_id,
                "SUCCESS",
                {
                    "status": "trained",
                    "model": model,
                    "event_id": event_id,
                    "step": first + k,
                    "version": version,
                    "loss": loss,
                },
                event_id=event_id,
            )
        return batch.results()

    def _answer_own_marks(self, batch: BatchPlan, marks: dict[int, bytes], version: int) -> None:
        """A job whose event's marker names its own result id was trained by an earlier delivery
        of this very message, whose result was lost (a failover kept the commit, not the result
        written after it): it answers ``trained`` with the marker's step, not ``duplicate``,
        whatever this batch did (committed, refused by a paused model, or by a guard's trip). Its
        ``version`` is ``version``, a checkpoint version that contains the event (the one this
        batch committed, or the one it read); its ``loss`` is null (the loss of that update is not
        kept). Write-once keeps the first result when it is still there. A re-send under another
        id still answers ``duplicate``."""
        jobs, event_ids = batch.jobs, batch.prep.event_ids
        for i, value in marks.items():
            found = own_trained(value, jobs[i].task_id, batch.model, event_ids[i], version)
            if found is not None:
                batch.outcomes[i] = found
                logger.info(
                    "model=%s event %r came back after its commit (step %d): answered trained",
                    batch.model,
                    event_ids[i],
                    found.result["step"],
                )

    # -- the guard ----------------------------------------------------------------------------

    def _refuse_paused(self, batch: BatchPlan, marks: dict[int, bytes]) -> list[Outcome]:
        """A paused model trains nothing: its events fail with ``GuardTrippedError`` and are
        dead-lettered (duplicates still answer ``duplicate``, and a message that trained its
        event before its result was lost ``trained``: ``_answer_own_marks``)."""
        model = batch.model
        exc = GuardTrippedError(
            f"model {model!r} is paused: its guard tripped; run `itrain resume --model {model}`, "
            "then send the refused events again"
        )
        for i in [*batch.train, *(i for i, _ in batch.copies)]:
            batch.fail(i, exc)
        self.store.dead_letter(model, batch.dead)
        if marks:
            self._answer_own_marks(batch, marks, batch.base.version)
        return batch.results()

    def _trip(
        self, batch: BatchPlan, ref: Reference, worst: Window, marks: dict[int, bytes]
    ) -> list[Outcome] | None:
        """The guard tripped on this batch: refuse its events, restore the best recent snapshot
        and pause the model, in one write fenced like a commit (``None`` when the checkpoint moved
        on: the batch is tried again on the new one). A job whose event was trained before, by an
        earlier delivery of the same message, answers ``trained`` with its step
        (``_answer_own_marks``; the version is the one read, which contains it: the rollback
        may not)."""
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
        if marks:
            self._answer_own_marks(batch, marks, batch.base.version)
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
        self.store.dead_letter(model, [job_dead_letter(j, exc) for j in jobs])
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
        exporter``), and with ``ITRAIN_RECORD_TIMINGS`` into the bench's list: one round trip,
        or none when deferred (``queue_timings``)."""
        self._timings.append((model, waited, held, n))
        if not self.defer_timings:
            self.flush_timings()

    @property
    def timings_waiting(self) -> bool:
        """Whether timings are kept for a round trip still to come (``defer_timings``)."""
        return bool(self._timings)

    def flush_timings(self) -> None:
        """Write the timings kept so far, in one round trip."""
        if self._timings:
            pipe = self.store.client.pipeline(transaction=False)
            self.queue_timings(pipe)
            pipe.execute()

    def queue_timings(self, pipe: Pipeline) -> None:
        """The timings kept so far, queued on ``pipe`` (of the store's Redis), and forgotten here.
        ``run_messages`` sends them in front of the results it writes: the results' round trip
        carries them, and whoever sees a batch's results sees its timings."""
        timings, self._timings = self._timings, []
        for model, waited, held, n in timings:
            self._queue_timing(pipe, model, waited, held, n)

    def _queue_timing(self, pipe: Pipeline, model: str, waited: float, held: float, n: int) -> None:
        keys = ModelKeys(model)
        for prefix, seconds in (("w", waited), ("h", held)):
            pipe.hincrby(keys.lock_stats, f"{prefix}:{bisect_left(LOCK_BUCKETS, seconds)}", 1)
            pipe.hincrbyfloat(keys.lock_stats, f"{prefix}:sum", seconds)
        if self.settings.record_timings:
            key = keys.prefix + "timings"
            pipe.lpush(key, f"{waited:.6f} {held:.6f} {n}")
            pipe.ltrim(key, 0, 99_999)
