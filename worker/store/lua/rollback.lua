-- rollback.lua: restores a snapshot's weights as a new version of the model.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the snapshot hash (itrain:{m}:snap:<version>)
-- ARGV[1]  the new checkpoint id (cid)          ARGV[2]  now (epoch seconds)
--
-- Run under the model's lock. The weights, their configuration and the running loss come from
-- the snapshot; the version rises (versions never go back: a worker's cached copy of the undone
-- weights can never pass for the restored ones); the step keeps counting events trained; the
-- generation stays, so the events undone keep their de-dup markers (a re-send answers duplicate).
-- Returns {1, new version} or {0, reason}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 'no-model'} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 'no-snapshot'} end
-- A snapshot of a model since replaced (`itrain init --force`, an import) is not this model's.
if redis.call('HGET', KEYS[2], 'gen') ~= redis.call('HGET', KEYS[1], 'gen') then return {0, 'other-generation'} end
local snap = redis.call('HMGET', KEYS[2], 'params', 'meta', 'config', 'loss_ema', 'loss_last')
local version = tonumber(redis.call('HGET', KEYS[1], 'version')) + 1
redis.call('HSET', KEYS[1], 'params', snap[1], 'meta', snap[2], 'config', snap[3], 'version', version,
           'cid', ARGV[1], 'updated_at', ARGV[2])
for i, name in ipairs({'loss_ema', 'loss_last'}) do
  if snap[3 + i] then redis.call('HSET', KEYS[1], name, snap[3 + i]) else redis.call('HDEL', KEYS[1], name) end
end
return {1, version}
