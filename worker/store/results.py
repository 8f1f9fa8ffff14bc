"""Per-event job results, written straight into Celery's Redis result backend.

A ``train_many`` chunk or a micro-batch trains many events in one task, yet every event has its
own ``AsyncResult``. Each result is stored exactly as Celery's Redis backend stores a task's
(``SET celery-task-meta-<id> ... EX`` and a ``PUBLISH`` on the same name, which wakes any
``AsyncResult.get()`` waiting on it). One script call writes a whole batch: a round trip and a
command to encode instead of two commands per event, which cost more than training the event.

Each stored result names the event it answers (its result's ``event_id``; a FAILURE's in a
top-level ``event_id`` in Celery's meta, which Celery ignores), and the script
(``lua/write_results.lua``) applies one precedence rule: results are write-once, except that
``trained`` replaces an earlier FAILURE, ``skipped`` or ``duplicate`` of the same event; nothing
replaces ``trained``, and a result is never written over one for a different event. So a forged
message naming another job's id cannot change that job's answer, and a redelivery that trains an
event after its lock_timeout FAILURE says so.

A ``train_many`` chunk has one result for all its events (``ChunkResult``, whose stored form is
``producer.chunks``'s); the same rule holds for each of its entries, applied by
``producer.chunks.merge_chunk`` when a chunk's result is already stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from producer.chunks import chunk_result, merge_chunk, parse_handle_id
from producer.protocol import result_key
from worker.lua import load_lua
from worker.outcome import Outcome, failure_payload
from worker.store.replicas import ReplicaBarrier

# ``Outcome`` and ``failure_payload`` live in ``worker.outcome`` (the engine makes outcomes and
# must not import the store); they are named here too, as what ``write_results`` writes.
__all__ = [
    "ChunkResult",
    "Outcome",
    "failure_payload",
    "guarded_written",
    "queue_guarded_results",
    "write_results",
]


class ChunkResult:
    """The one result of a ``train_many`` chunk: the outcomes of its events, by index."""

    __slots__ = ("outcomes", "task_id")

    def __init__(self, task_id: str, size: int, outcomes: Sequence[Outcome]) -> None:
        self.task_id = task_id
        self.outcomes: list[Outcome | None] = [None] * size
        for o in outcomes:
            parsed = parse_handle_id(o.task_id)
            if parsed is not None and parsed[0] == task_id and parsed[1] < size:
                self.outcomes[parsed[1]] = o

    def result(self) -> dict[str, Any]:
        """The chunk's ``result``: ids, and a short entry per event (``producer.chunks``)."""
        ids: list[str | None] = []
        models: list[str] = []
        entries: list[Any] = []
        for o in self.outcomes:
            ids.append(o.event_id if o is not None else None)
            if o is not None and o.trained:
                r = o.result
                models.append(r["model"])
                entries.append([r["step"], r["version"], r["loss"]])
            else:
                models.append("")
                entries.append(None if o is None else o.result)
        return chunk_result(models, ids, entries)


def write_results(
    client: redis.Redis,
    outcomes: Sequence[Outcome | ChunkResult],
    expires: int,
    *,
    before: Callable[[Pipeline], None] | None = None,
    barrier: ReplicaBarrier | None = None,
    event_ids: Sequence[str] = (),
) -> int:
    """Write each outcome's result under the precedence rule; returns how many were written (the
    others were refused: an earlier result stands). ``before`` queues commands of the caller's
    to go first in the same round trip (they run before any result is written). ``barrier``
    (``ITRAIN_MIN_REPLICAS``) follows the results in their round trip: ``ReplicationError``, a
    Redis fault, when too few replicas hold them in time (``event_ids`` are named in it)."""
    if not outcomes:
        if before is not None:
            pipe = client.pipeline(transaction=False)
            before(pipe)
            pipe.execute()
        return 0
    keys, args = _arguments(outcomes, expires, "")
    written, *met = _run(client, keys, args, before, barrier, event_ids)
    found = list(zip(met[0::3], met[1::3], met[2::3], strict=True))
    if not found:
        return int(written)
    merged = _merge_chunks(client, found, expires)
    if barrier is not None:  # (a redelivered chunk's merge: rare, a round trip of its own)
        barrier.cross(event_ids, "results")
    return int(written) + merged


def queue_guarded_results(
    pipe: Pipeline, outcomes: Sequence[Outcome | ChunkResult], expires: int, ckpt_key: str, cid: str
) -> None:
    """Queue ``outcomes``' results on ``pipe``, to be written only if the checkpoint ``ckpt_key``
    holds commit id ``cid`` when they run: a batch's results ride in its commit's round trip,
    behind the commit (``Trainer``). The reply goes to ``guarded_written``."""
    keys, args = _arguments(outcomes, expires, cid)
    # A restarted Redis that forgot the script answers NOSCRIPT: ``write_results`` writes them then.
    pipe.evalsha(_SHA, len(keys) + 1, ckpt_key, *keys, *args)


def guarded_written(reply: Any) -> int | None:
    """How many results a ``queue_guarded_results`` wrote; None when its guard refused them all
    (the commit did not land, or another landed after it), the script failed, or a chunk's result
    met one stored already (a redelivered chunk): then the caller writes them all with
    ``write_results``, which merges the chunk's and leaves the others' as they stand."""
    if isinstance(reply, Exception) or not isinstance(reply, list) or len(reply) != 1 or int(reply[0]) < 0:
        return None
    return int(reply[0])


def _arguments(
    outcomes: Sequence[Outcome | ChunkResult], expires: int, guard: str
) -> tuple[list[str], list[bytes | str | int]]:
    """write_results.lua's result keys and arguments (see the script) for ``outcomes``."""
    done = datetime.now(UTC).isoformat()
    keys: list[str] = []
    args: list[bytes | str | int] = [expires, guard]
    for o in outcomes:
        keys.append(result_key(o.task_id))
        meta: dict[str, Any]
        if isinstance(o, ChunkResult):
            meta = {"status": "SUCCESS", "result": o.result(), "date_done": done, "task_id": o.task_id}
            args.extend((orjson.dumps(meta), "", "c"))
            continue
        # Compact: Celery reads a missing traceback or children as none. The event's id is in
        # a SUCCESS result already; only a FAILURE needs it beside (for the precedence rule).
        meta = {"status": o.status, "result": o.result, "date_done": done, "task_id": o.task_id}
        if o.status != "SUCCESS" and o.event_id is not None:
            meta["event_id"] = o.event_id
        args.extend((orjson.dumps(meta), o.event_id or "", 1 if o.trained else 0))
    return keys, args


def _merge_chunks(
    client: redis.Redis, found: list[tuple[bytes, bytes, bytes]], expires: int, attempts: int = 5
) -> int:
    """Chunk results that met a stored one (a redelivered chunk), as (key, stored, ours): merged
    event by event, and written if the stored value has not changed since (else read and merged
    again)."""
    written = 0
    for _ in range(attempts):
        args: list[bytes | str | int] = [expires, ""]
        tried: list[tuple[bytes, bytes]] = []
        for key, old, new in found:
            merged = merge_chunk(orjson.loads(old), orjson.loads(new))
            if merged is not None:
                args.extend((orjson.dumps(merged), old, "r"))
                tried.append((key, new))
        if not tried:
            break
        n, *_ = _script(client)(keys=[key for key, _ in tried], args=args, client=client)
        written += int(n)
        if int(n) == len(tried):
            break
        # Someone wrote one of them meanwhile: read what is there now and merge again.
        now: list[bytes | None] = client.mget([key for key, _ in tried])  # type: ignore[assignment]
        found = [(k, stored, new) for (k, new), stored in zip(tried, now, strict=True) if stored is not None]
    return written


def _run(
    client: redis.Redis,
    keys: list[str],
    args: list[bytes | str | int],
    before: Callable[[Pipeline], None] | None,
    barrier: ReplicaBarrier | None,
    event_ids: Sequence[str],
) -> Any:
    """write_results.lua's reply, after ``before``'s commands and before ``barrier`` in the same
    round trip."""
    script = _script(client)
    if before is None and barrier is None:
        # ``client=`` always: a cached Script must never run on a client other than this one.
        return script(keys=keys, args=args, client=client)
    pipe = client.pipeline(transaction=False)
    if before is not None:
        before(pipe)
    # EVALSHA itself: a script object on a pipeline costs a SCRIPT EXISTS round trip first.
    pipe.evalsha(script.sha, len(keys), *keys, *args)
    if barrier is not None:
        barrier.queue(pipe)
    replies = pipe.execute(raise_on_error=False)
    crossed = replies[-2:] if barrier is not None else []
    *theirs, reply = replies[:-2] if barrier is not None else replies
    for r in theirs:
        if isinstance(r, Exception):
            raise r
    if isinstance(reply, NoScriptError):  # a restarted Redis forgot it: sent whole this once
        reply = script(keys=keys, args=args, client=client)
        if barrier is not None:
            barrier.cross(event_ids, "results")
        return reply
    if isinstance(reply, Exception):
        raise reply
    if barrier is not None:
        barrier.check(crossed, event_ids, "results")
    return reply


def _script(client: redis.Redis) -> Any:
    # register_script only hashes the text; EVALSHA falls back to EVAL after a Redis restart.
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(load_lua("worker.store", "write_results"))
    return script


_scripts: dict[int, Any] = {}
_SHA = hashlib.sha1(load_lua("worker.store", "write_results").encode()).hexdigest()
