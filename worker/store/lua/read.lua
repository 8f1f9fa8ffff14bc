-- read.lua: a model's checkpoint, in one atomic call (weights never without their version).
--
-- KEYS[1]  the checkpoint hash (itrain:{model}:ckpt)
-- ARGV[1]  the tag (version:cid) of the caller's cached checkpoint, or '' when it has none
--
-- A checkpoint is named by its tag, version:cid, where cid is a random id written with every
-- commit and init. Versions alone can repeat (Redis restored from an older append-only file, a
-- failover to a lagging replica, a model deleted and made again); a tag does not, so a worker's
-- cached copy is never taken for a different checkpoint with the same version.
--
-- Returns false when the model has no checkpoint; {tag, gen} when the caller's cached copy is
-- current (no weights cross the network); else {tag, gen, version, params, meta, config, step,
-- loss_ema, loss_last}.
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return false end
local tag = v .. ':' .. (redis.call('HGET', KEYS[1], 'cid') or '')
if tag == ARGV[1] then return {tag, redis.call('HGET', KEYS[1], 'gen') or '0'} end
return {tag, redis.call('HGET', KEYS[1], 'gen') or '0', unpack(redis.call('HMGET', KEYS[1],
  'version', 'params', 'meta', 'config', 'step', 'loss_ema', 'loss_last'))}
