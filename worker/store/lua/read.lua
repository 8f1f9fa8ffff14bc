-- read.lua: a model's checkpoint, in one atomic call (weights never without their version).
--
-- KEYS[1]  the checkpoint hash (itrain:{model}:ckpt)      KEYS[2]  the evaluation ring
-- ARGV[1]  the tag (version:cid) of the caller's cached checkpoint, or '' when it has none
--
-- A checkpoint is named by its tag, version:cid, where cid is a random id written with every
-- commit and init (and by every script that changes the evaluation or the guard). Versions alone
-- can repeat (Redis restored from an older append-only file, a failover to a lagging replica, a
-- model deleted and made again); a tag does not, so a worker's cached copy is never taken for a
-- different checkpoint with the same version.
--
-- Returns false when the model has no checkpoint; {tag, gen, guard_ref} when the caller's cached
-- copy is current (no weights cross the network; the guard's reference is written by snapshots,
-- outside the lock, so it is always sent); else {tag, gen, guard_ref, version, params, meta,
-- config, step, loss_ema, loss_last, eval, eval_wn, eval_cap, guard, paused, ring}, the ring
-- only for a model with a guard (it needs the last events' losses) and '' otherwise.
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return false end
local tag = v .. ':' .. (redis.call('HGET', KEYS[1], 'cid') or '')
local gen = redis.call('HGET', KEYS[1], 'gen') or '0'
local ref = redis.call('HGET', KEYS[1], 'guard_ref') or ''
if tag == ARGV[1] then return {tag, gen, ref} end
local f = redis.call('HMGET', KEYS[1], 'version', 'params', 'meta', 'config', 'step', 'loss_ema',
  'loss_last', 'eval', 'eval_wn', 'eval_cap', 'guard', 'paused')
local ring = ''
if f[11] then ring = redis.call('GET', KEYS[2]) or '' end
return {tag, gen, ref, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], ring}
