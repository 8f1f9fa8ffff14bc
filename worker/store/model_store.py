"""The model store in Redis: checkpoint reads, the fenced commit, dead letters, model creation.

Every write that must be atomic is one Lua script, so a reader never sees weights without the
``version`` and ``step`` that go with them, and a commit either lands whole or not at all.
Key names come from ``producer.keys``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from producer.errors import ModelExistsError
from producer.keys import MODELS, UNROUTED_DEAD, ModelKeys
from producer.settings import Settings
from worker.engine.checkpoint import Checkpoint, decode, encode

__all__ = ["COMMIT", "READ", "CommitResult", "ReadResult", "Store"]

#: A checkpoint is named by its tag, ``version:cid``: ``cid`` is a random id written with every
#: commit and init. Versions alone can repeat (Redis restored from an older append-only file, a
#: failover to a lagging replica, a model deleted and made again); a tag does not, so a worker's
#: cached copy is never taken for a different checkpoint with the same version.
#: Returns nothing when the model has no checkpoint, only the tag and generation when the caller's
#: cached copy is current (no weights cross the network), else the whole checkpoint.
READ = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return false end
local tag = v .. ':' .. (redis.call('HGET', KEYS[1], 'cid') or '')
if tag == ARGV[1] then return {tag, redis.call('HGET', KEYS[1], 'gen') or '0'} end
return {tag, redis.call('HGET', KEYS[1], 'gen') or '0', unpack(redis.call('HMGET', KEYS[1],
  'version', 'params', 'meta', 'config', 'step', 'loss_ema', 'loss_last'))}
"""

#: The fenced commit. It lands only if the checkpoint is still the one read under the lock (same
#: tag): a holder whose lock expired while it was paused finds another checkpoint and is refused,
#: instead of overwriting newer weights. Weights, version, step, the event markers, history,
#: counters and dead letters are written together; lists are pushed a thousand at a time (Lua's
#: unpack has a limit near 8,000 values).
#: KEYS: ckpt stats actions history dead
#: ARGV: expected_tag params n loss_last loss_ema now history_max dedupe_ttl done_prefix dead_max
#:       n_actions n_history n_dead new_cid, then n event ids, n_actions (name, count) pairs,
#:       n_history entries (newest last), n_dead entries.
COMMIT = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v or v .. ':' .. (redis.call('HGET', KEYS[1], 'cid') or '') ~= ARGV[1] then
  return {0, v or -1, 0}
end
local function push(key, first, count)
  for s = first, first + count - 1, 1000 do
    redis.call('LPUSH', key, unpack(ARGV, s, math.min(s + 999, first + count - 1)))
  end
end
local n = tonumber(ARGV[3])
local n_actions, n_hist, n_dead = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local step0 = tonumber(redis.call('HGET', KEYS[1], 'step'))
local newv = tonumber(v)
local i = 15
if n > 0 then
  newv = newv + 1
  redis.call('HSET', KEYS[1], 'params', ARGV[2], 'version', newv, 'cid', ARGV[14], 'step', step0 + n,
             'loss_last', ARGV[4], 'loss_ema', ARGV[5], 'updated_at', ARGV[6])
  for j = 1, n do
    redis.call('SET', ARGV[9] .. ARGV[i], step0 + j, 'EX', ARGV[8])
    i = i + 1
  end
  redis.call('HINCRBY', KEYS[2], 'interactions', n)
end
for j = 1, n_actions do
  -- At most 256 action names are counted apiece (labelled events may name any action).
  local name = ARGV[i]
  if redis.call('HEXISTS', KEYS[3], name) == 0 and redis.call('HLEN', KEYS[3]) >= 256 then
    name = '_other'
  end
  redis.call('HINCRBY', KEYS[3], name, ARGV[i + 1])
  i = i + 2
end
if n_hist > 0 then
  push(KEYS[4], i, n_hist)
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
  i = i + n_hist
end
if n_dead > 0 then
  push(KEYS[5], i, n_dead)
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[10]) - 1)
  redis.call('HINCRBY', KEYS[2], 'failures', n_dead)
end
return {1, newv, step0}
"""

#: Dead letters for a model if it exists, else for the unrouted list (so hostile messages naming
#: random models cannot create keys). KEYS: models dead stats unrouted; ARGV: model max entries...
DEAD = """
local dead, stats = KEYS[2], KEYS[3]
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then dead, stats = KEYS[4], false end
for s = 3, #ARGV, 1000 do
  redis.call('LPUSH', dead, unpack(ARGV, s, math.min(s + 999, #ARGV)))
end
redis.call('LTRIM', dead, 0, tonumber(ARGV[2]) - 1)
if stats then redis.call('HINCRBY', stats, 'failures', #ARGV - 2) end
return 1
"""

#: Creates (or, with force, replaces) a model. The version keeps rising across a replacement, so
#: a worker's cached copy of the old model can never pass for the new one.
#: KEYS: models ckpt stats actions history dead; ARGV: model force fields...
INIT = """
local old = redis.call('HGET', KEYS[2], 'version')
if old and ARGV[2] ~= '1' then return {0, old} end
local version = (tonumber(old) or 0) + 1
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
-- A new generation: the old model's event markers (keyed by generation) no longer count.
redis.call('HSET', KEYS[2], 'version', version, 'gen', version, unpack(ARGV, 3))
redis.call('SADD', KEYS[1], ARGV[1])
return {1, version}
"""


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What a read under the lock found: the current checkpoint (the caller's cached one when it is
    still current) and, for each event id asked about, whether it is already in the weights."""

    state: Literal["missing", "unchanged", "fresh"]
    checkpoint: Checkpoint | None
    done: list[bool]


@dataclass(frozen=True, slots=True)
class CommitResult:
    ok: bool
    version: int
    first_step: int
    cid: str


class Store:
    """Redis I/O for models; one instance per process, shared by its tasks."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._read = client.register_script(READ)
        self._commit = client.register_script(COMMIT)
        self._dead = client.register_script(DEAD)
        self._init = client.register_script(INIT)

    def read(self, model: str, cached: Checkpoint | None, event_ids: Sequence[str]) -> ReadResult:
        """The checkpoint (none of its weights when ``cached`` is current) and which events are
        done: one round trip, or two when the model's generation is not the cached one."""
        keys = ModelKeys(model)
        pipe = self.client.pipeline(transaction=False)
        self._read(keys=[keys.ckpt], args=[cached.tag if cached else ""], client=pipe)
        guess = cached.gen if cached else None
        if event_ids and guess is not None:
            pipe.mget([keys.done(guess, e) for e in event_ids])
        replies = pipe.execute()
        reply = replies[0]
        if not reply:
            return ReadResult("missing", None, [False] * len(event_ids))
        tag, gen = reply[0].decode(), int(reply[1])
        if len(reply) == 2 and cached is not None:
            state: Literal["unchanged", "fresh"] = "unchanged"
            ckpt = cached
        else:
            version, params, meta, config, step, loss_ema, loss_last = reply[2:]
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
        if not event_ids:
            return ReadResult(state, ckpt, [])
        values = replies[1] if guess == gen else self.client.mget([keys.done(gen, e) for e in event_ids])
        return ReadResult(state, ckpt, [v is not None for v in values])

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
        loss_last: float,
        loss_ema: float,
        actions: dict[str, int],
        history: Sequence[bytes],
        dead: Sequence[bytes],
    ) -> CommitResult:
        """The fenced commit (script ``COMMIT``); ``ok`` is False when the checkpoint moved on."""
        keys = ModelKeys(model)
        s = self.settings
        cid = new_cid()
        args: list[Any] = [
            expected.tag,
            params,
            len(event_ids),
            repr(loss_last),
            repr(loss_ema),
            time.time(),
            s.history_max,
            s.dedupe_ttl,
            keys.done_prefix(expected.gen),
            s.dead_letter_max,
            len(actions),
            len(history),
            len(dead),
            cid,
        ]
        args.extend(event_ids)
        for name, count in actions.items():
            args.extend((name, count))
        args.extend(history)
        args.extend(dead)
        ok, version, first = self._commit(
            keys=[keys.ckpt, keys.stats, keys.actions, keys.history, keys.dead], args=args
        )
        return CommitResult(bool(ok), int(version), int(first), cid)

    def dead_letter(self, model: str, entries: Sequence[bytes]) -> None:
        """Record failed messages in the model's bounded dead-letter list (or the unrouted one)."""
        if not entries:
            return
        keys = ModelKeys(model)
        self._dead(
            keys=[MODELS, keys.dead, keys.stats, UNROUTED_DEAD],
            args=[model, self.settings.dead_letter_max, *entries],
        )

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
            keys=[MODELS, keys.ckpt, keys.stats, keys.actions, keys.history, keys.dead], args=flat
        )
        if not ok:
            raise ModelExistsError(
                f"model {model!r} already exists at version {int(version)}; use --force to replace it"
            )
        return int(version)

    def models(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in self.client.smembers(MODELS))


def new_cid() -> str:
    return uuid.uuid4().hex
