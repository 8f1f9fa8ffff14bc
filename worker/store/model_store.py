"""The model store in Redis: checkpoint reads, the fenced commit, dead letters, model creation.

Every write that must be atomic is one Lua script, so a reader never sees weights without the
``version`` and ``step`` that go with them, and a commit either lands whole or not at all. The
scripts are ``lua/{read,done,commit,dead,init,restore}.lua`` beside this module, each with a header naming
its KEYS and ARGV; every key a script touches is declared in its KEYS.
Key names come from ``producer.keys``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from producer.errors import CheckpointError, ModelExistsError
from producer.keys import (
    MODELS,
    UNROUTED_DEAD,
    UNROUTED_DEAD_ERRORS,
    ModelKeys,
    marker_field,
    marker_slots,
    slot_seconds,
)
from producer.settings import Settings
from worker.engine.checkpoint import Checkpoint, decode, encode
from worker.engine.evaluation import EvalUpdate, decode_state
from worker.engine.guard import Reference, parse_guard, parse_reference
from worker.lua import load_lua
from worker.store.lock import ModelLock
from worker.store.markers import result_digest
from worker.store.replicas import ReplicaBarrier

__all__ = ["CommitResult", "ReadResult", "Restored", "Store"]


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What a read under the lock found: the current checkpoint (the caller's cached one when it is
    still current) and, for each event id asked about, whether it is already in the weights."""

    state: Literal["missing", "unchanged", "fresh"]
    checkpoint: Checkpoint | None
    done: list[bool]
    #: The guard's reference (the best recent snapshot), read every time: snapshots set it.
    guard_ref: Reference | None = None
    #: The value of each found marker, by the event's index (``worker.store.markers``).
    marks: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Restored:
    """What ``Store.restore`` did: ``ok`` and the new ``version``, whether the snapshot's weights
    were ``restored``, else ``reason`` (``no-model``, ``no-snapshot``, ``other-generation``,
    ``moved``)."""

    ok: bool
    version: int
    restored: bool
    reason: str


@dataclass(frozen=True, slots=True)
class CommitResult:
    ok: bool
    version: int
    first_step: int
    cid: str
    #: The replies of the commands ``after`` queued behind the commit (``Store.commit``).
    after: list[Any] = field(default_factory=list)


class Store:
    """Redis I/O for models; one instance per process, shared by its tasks."""

    def __init__(
        self, client: redis.Redis, settings: Settings, barrier: ReplicaBarrier | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        #: The wait for replicas that follows every commit that lands, in its round trip
        #: (``ITRAIN_MIN_REPLICAS``, ``worker.store.replicas``); None: nothing waits.
        self.barrier = barrier
        # The scripts and what their KEYS and ARGV are: worker/store/lua/*.lua.
        self._read = client.register_script(load_lua(__package__, "read"))
        self._done = client.register_script(load_lua(__package__, "done"))
        self._commit = client.register_script(load_lua(__package__, "commit"))
        self._dead = client.register_script(load_lua(__package__, "dead"))
        self._init = client.register_script(load_lua(__package__, "init"))
        self._restore = client.register_script(load_lua(__package__, "restore"))

    @overload
    def read(
        self, model: str, cached: Checkpoint | None, event_ids: Sequence[str], *, now: float | None = None
    ) -> ReadResult: ...

    @overload
    def read(
        self,
        model: str,
        cached: Checkpoint | None,
        event_ids: Sequence[str],
        *,
        now: float | None = None,
        lock: ModelLock,
    ) -> ReadResult | None: ...

    def read(
        self,
        model: str,
        cached: Checkpoint | None,
        event_ids: Sequence[str],
        *,
        now: float | None = None,
        lock: ModelLock | None = None,
    ) -> ReadResult | None:
        """The checkpoint (none of its weights when ``cached`` is current) and which events are
        done (trained within the de-duplication window before ``now``): one round trip, or two
        when the model's generation is not the cached one.

        With ``lock``, one try at the lock goes first in the same round trip (Redis runs the
        read after the ``SET NX``, so what it reads is what the lock now guards): ``None`` when
        the lock was not free, and nothing read is used."""
        keys = ModelKeys(model)
        slots = marker_slots(time.time() if now is None else now, self.settings.dedupe_ttl)
        guess = cached.gen if cached else None
        fields = [marker_field(e) for e in event_ids]
        done_keys = [keys.done(guess, slot) for slot in slots] if fields and guess is not None else []

        def queue(pipe: Pipeline) -> None:
            # EVALSHA itself: redis-py's script objects on a pipeline cost a SCRIPT EXISTS round
            # trip first, on every execute.
            pipe.evalsha(self._read.sha, 2, keys.ckpt, keys.eval_ring, cached.tag if cached else "")
            if done_keys:
                pipe.evalsha(self._done.sha, len(done_keys), *done_keys, *fields)

        pipe = self.client.pipeline(transaction=False)
        if lock is not None:
            lock.queue_acquire(pipe)
        queue(pipe)
        replies = pipe.execute(raise_on_error=False)
        if lock is not None and not lock.took(replies.pop(0)):
            return None
        if any(isinstance(r, NoScriptError) for r in replies):
            # A restarted Redis forgot the scripts: load them and read again (a read is idempotent).
            self._load(self._read, self._done)
            pipe = self.client.pipeline(transaction=False)
            queue(pipe)
            replies = pipe.execute(raise_on_error=False)
        for r in replies:
            if isinstance(r, Exception):
                raise r
        reply = replies[0]
        if not reply:
            return ReadResult("missing", None, [False] * len(event_ids))
        tag, gen, ref = reply[0].decode(), int(reply[1]), parse_reference(reply[2])
        if len(reply) == 3 and cached is not None:
            state: Literal["unchanged", "fresh"] = "unchanged"
            ckpt = cached
        else:
            version, params, meta, config, step, loss_ema, loss_last = reply[3:10]
            evaluation, eval_wn, eval_cap, guard, paused, ring = reply[10:]
            state = "fresh"
            ckpt = decode(
                params=params,
                meta=meta,
                config=config,
                version=version,
                step=step,
                loss_ema=loss_ema,
                loss_last=loss_last,
                cid=tag.partition(":")[2],
                gen=gen,
            )
            ckpt.guard = parse_guard(guard)
            ckpt.paused = bool(paused)
            ckpt.eval = decode_state(
                evaluation, eval_wn, eval_cap, ring if ckpt.guard else None, self.settings.eval_window
            )
        if not event_ids:
            return ReadResult(state, ckpt, [], ref)
        if guess == gen:
            found = replies[1]
        else:
            found = self._done(keys=[keys.done(gen, slot) for slot in slots], args=fields)
        if isinstance(found, bytes):  # no event marked: the common reply, the flags alone
            return ReadResult(state, ckpt, [flag == 49 for flag in found], ref)  # b"1"
        flags, *values = found
        done = [flag == 49 for flag in flags]
        marks = dict(zip([i for i, d in enumerate(done) if d], values, strict=True))
        return ReadResult(state, ckpt, done, ref, marks)

    def _load(self, *scripts: Script) -> None:
        for script in scripts:
            self.client.script_load(script.script)

    def load(self, model: str) -> Checkpoint | None:
        """The current checkpoint, read without the lock (one atomic script)."""
        return self.read(model, None, ()).checkpoint

    def commit(
        self,
        model: str,
        *,
        expected: Checkpoint,
        params: bytes,
        event_ids: Sequence[str],
        result_ids: Sequence[str] = (),
        loss_last: float,
        loss_ema: float,
        actions: dict[str, int],
        history: Sequence[bytes],
        dead: Sequence[bytes],
        evaluation: EvalUpdate | None = None,
        now: float | None = None,
        latency: Sequence[tuple[str, int | float]] = (),
        release: ModelLock | None = None,
        cid: str | None = None,
        after: Callable[[Pipeline], None] | None = None,
    ) -> CommitResult:
        """The fenced commit (``lua/commit.lua``); ``ok`` is False when the checkpoint moved on.
        With ``release``, that lock is given back in the same round trip, right after the commit
        (committed or refused); a commit that must be sent again (below) goes without it, fenced
        as ever. ``after`` queues commands of the caller's behind the commit and the release in
        the same round trip (the batch's results, guarded by ``cid``, the commit id this commit
        writes: new by default); their replies are the result's ``after``, empty when the commit
        had to be sent again. The store's ``barrier``, if any, comes last in that round trip, and
        a commit that landed raises ``ReplicationError`` (a Redis fault) when too few replicas
        hold it in time.
        ``evaluation`` is written with the weights (it is needed whenever events trained).
        ``now`` (this host's clock by default) picks the event markers' slots to declare.
        ``result_ids``, one per event (or none), are the ids of the results that answer them: each
        marker keeps a digest of its own (``worker.store.markers``). ``latency``: (field,
        increment) pairs added to the latency histograms with the commit
        (``worker.engine.latency``)."""
        keys = ModelKeys(model)
        s = self.settings
        cid = cid or new_cid()
        width = slot_seconds(s.dedupe_ttl)
        # The markers go to the slot of Redis's clock; the script may touch only the hashes named
        # here, so name this clock's slot and one each side (hosts' clocks differ a little).
        first = int((time.time() if now is None else now) // width) - 1
        args: list[Any] = [
            expected.tag,
            params,
            len(event_ids),
            repr(loss_last),
            repr(loss_ema),
            time.time(),
            s.history_max,
            s.dedupe_ttl,
            first,
            s.dead_letter_max,
            len(actions),
            len(history),
            len(dead),
            cid,
        ]
        if evaluation is not None:
            ev = evaluation.state
            loss, guard = evaluation.guard_loss, expected.guard
            guard_loss = "" if loss is None or guard is None else f"{loss!r} {guard.baseline}"
            args.extend((evaluation.json, ev.wn, ev.cap, guard_loss, len(evaluation.segments)))
        else:
            args.extend(("", 0, 0, "", 0))
        args.extend(marker_field(e) for e in event_ids)
        if result_ids:
            args.extend(result_digest(r) for r in result_ids)
        else:
            args.extend([""] * len(event_ids))
        for name, count in actions.items():
            args.extend((name, count))
        args.extend(history)
        args.extend(dead)
        if evaluation is not None:
            for offset, data in evaluation.segments:
                args.extend((offset, data))
        args.append(len(latency))
        for name, increment in latency:
            args.extend((name, increment))
        named = [keys.ckpt, keys.stats, keys.actions, keys.history, keys.dead, keys.eval_ring]
        counters = [keys.latency, keys.dead_errors]
        for _ in range(3):
            markers = [keys.done(expected.gen, first + k) for k in range(3)]
            keys_now = [*named, *markers, *counters]
            (ok, version, step0), theirs = self._commit_once(keys_now, args, release, after, event_ids)
            release, after = None, None
            if ok != -1:
                return CommitResult(ok == 1, int(version), int(step0), cid, theirs)
            # This host's clock is more than a slot away from Redis's: name Redis's slot (the
            # reply) and its neighbours, and commit again (nothing was written).
            first = args[8] = int(version) - 1
        raise CheckpointError(
            f"model {model!r}: the commit found Redis's clock in another marker slot each time "
            "(a clock jumping by a quarter of ITRAIN_DEDUPE_TTL?)"
        )

    def _commit_once(
        self,
        keys: list[str],
        args: list[Any],
        release: ModelLock | None,
        after: Callable[[Pipeline], None] | None,
        event_ids: Sequence[str],
    ) -> tuple[Any, list[Any]]:
        """commit.lua's reply, and those of ``after``'s commands; the lock's release after the
        commit in the same round trip, if owned, then ``after``'s commands, then the barrier."""
        barrier = self.barrier
        if release is None or not release.owned:
            release = None
        if release is None and after is None and barrier is None:
            return self._commit(keys=keys, args=args), []
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(self._commit.sha, len(keys), *keys, *args)
        if release is not None:
            release.queue_release(pipe)
        if after is not None:
            after(pipe)
        if barrier is not None:
            barrier.queue(pipe)
        reply, *theirs = pipe.execute(raise_on_error=False)
        crossed = theirs[-2:] if barrier is not None else []
        if barrier is not None:
            del theirs[-2:]
        if release is not None:
            release.released(theirs.pop(0))
        if isinstance(reply, NoScriptError):
            # A restarted Redis forgot it (nothing was written): the script object sends it whole.
            reply, theirs = self._commit(keys=keys, args=args), []
            if barrier is not None and int(reply[0]) == 1 and event_ids:
                barrier.cross(event_ids, "commit")
            return reply, theirs
        if isinstance(reply, Exception):
            raise reply
        # Only a commit that landed and marked events has anything to lose: a refused one wrote
        # nothing, one that trained no event only counters (its answers wait for their own).
        if barrier is not None and int(reply[0]) == 1 and event_ids:
            barrier.check(crossed, event_ids, "commit")
        return reply, theirs

    def dead_letter(self, model: str, entries: Sequence[bytes]) -> None:
        """Record failed messages in the model's bounded dead-letter list (or the unrouted one);
        the store's barrier, if any, in the same round trip (``ReplicationError`` on a shortfall)."""
        if not entries:
            return
        keys = ModelKeys(model)
        names = [MODELS, keys.dead, keys.stats, UNROUTED_DEAD, keys.dead_errors, UNROUTED_DEAD_ERRORS]
        args: list[bytes | str | int] = [model, self.settings.dead_letter_max, *entries]
        if self.barrier is None:
            self._dead(keys=names, args=args)
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(self._dead.sha, len(names), *names, *args)
        self.barrier.queue(pipe)
        reply, *crossed = pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError):  # a restarted Redis forgot it: sent whole, then waited
            self._dead(keys=names, args=args)
            self.barrier.cross([], "dead letters")
        elif isinstance(reply, Exception):
            raise reply
        else:
            self.barrier.check(crossed, [], "dead letters")

    def create(self, model: str, ckpt: Checkpoint, *, force: bool) -> int:
        """Write a new model's first checkpoint; returns its version.

        Without ``force`` an existing model is left alone and ``ModelExistsError`` is raised. With
        it, the old history, counters and dead letters go too, and a new generation starts: the
        old event markers no longer count and expire by their TTL.
        """
        keys = ModelKeys(model)
        fields = encode(ckpt)
        fields.pop("version")
        fields["cid"] = new_cid()
        flat: list[Any] = [model, "1" if force else "0"]
        for name, value in fields.items():
            flat.extend((name, value))
        ok, version = self._init(
            keys=[MODELS, keys.ckpt, keys.stats, keys.actions, keys.history, keys.dead, keys.eval_ring],
            args=flat,
        )
        if not ok:
            raise ModelExistsError(
                f"model {model!r} already exists at version {int(version)}; use --force to replace it"
            )
        return int(version)

    def restore(
        self,
        model: str,
        snapshot: int,
        *,
        trip: bool,
        expected: str = "",
        dead: Sequence[bytes] = (),
    ) -> Restored:
        """``lua/restore.lua``: snapshot ``snapshot``'s weights as a new version (a rollback), or
        a guard's trip (fenced on ``expected``, pausing the model, with ``dead`` letters; when the
        snapshot is gone it still pauses). Run under the model's lock."""
        keys = ModelKeys(model)
        snap = keys.snapshot_prefix + str(snapshot)
        reply = self._restore(
            keys=[keys.ckpt, snap, keys.eval_ring, keys.stats, keys.dead, keys.dead_errors],
            args=[
                "trip" if trip else "rollback",
                new_cid(),
                time.time(),
                expected,
                self.settings.dead_letter_max,
                *dead,
            ],
        )
        if reply[0]:
            return Restored(True, int(reply[1]), bool(reply[2]), "")
        reason = reply[1]
        return Restored(False, 0, False, reason.decode() if isinstance(reason, bytes) else str(reason))

    def models(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in self.client.smembers(MODELS))


def new_cid() -> str:
    return uuid.uuid4().hex
