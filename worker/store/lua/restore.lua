-- restore.lua: a snapshot's weights restored as a new version: a rollback, or a guard's trip.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the snapshot hash (itrain:{m}:snap:<version>)
-- KEYS[3]  the evaluation ring      KEYS[4]  the stats hash        KEYS[5]  the dead-letter list
-- KEYS[6]  the dead letters' counts by error type (as dead.lua counts them)
-- ARGV[1]  'rollback' or 'trip'     ARGV[2]  the new checkpoint id (cid)
-- ARGV[3]  now (epoch seconds)      ARGV[4]  expected tag (version:cid); '' for a rollback
-- ARGV[5]  dead_max                 ARGV[6...] dead letters (a trip's refused events)
--
-- Run under the model's lock. The weights, their configuration and the running loss come from
-- the snapshot; the version rises (versions never go back: a worker's cached copy of the undone
-- weights can never pass for the restored ones); the step keeps counting events trained; the
-- generation stays, so the events undone keep their de-dup markers (a re-send answers
-- duplicate). The evaluation window restarts (its losses were the undone weights').
-- A trip is fenced like a commit (the tag read under the lock) and also pauses the model,
-- counts the trip and writes the refused events' dead letters, all in this one write; a trip
-- whose snapshot is gone still pauses.
-- Returns {1, new version, 1 if weights were restored else 0} or {0, reason}.
local trip = ARGV[1] == 'trip'
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {0, 'no-model'} end
if trip and v .. ':' .. (redis.call('HGET', KEYS[1], 'cid') or '') ~= ARGV[4] then return {0, 'moved'} end
local restored = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  -- A snapshot of a model since replaced (`itrain init --force`, an import) is not this model's.
  if redis.call('HGET', KEYS[2], 'gen') == redis.call('HGET', KEYS[1], 'gen') then
    restored = 1
  elseif not trip then
    return {0, 'other-generation'}
  end
elseif not trip then
  return {0, 'no-snapshot'}
end
local version = tonumber(v) + 1
if restored == 1 then
  local snap = redis.call('HMGET', KEYS[2], 'params', 'meta', 'config', 'loss_ema', 'loss_last')
  redis.call('HSET', KEYS[1], 'params', snap[1], 'meta', snap[2], 'config', snap[3])
  for i, name in ipairs({'loss_ema', 'loss_last'}) do
    if snap[3 + i] then redis.call('HSET', KEYS[1], name, snap[3 + i]) else redis.call('HDEL', KEYS[1], name) end
  end
end
redis.call('HSET', KEYS[1], 'version', version, 'cid', ARGV[2], 'updated_at', ARGV[3], 'eval_wn', 0)
redis.call('HDEL', KEYS[1], 'guard_loss')
redis.call('DEL', KEYS[3])
if trip then
  redis.call('HSET', KEYS[1], 'paused', '1')
  redis.call('HINCRBY', KEYS[1], 'trips', 1)
  if #ARGV > 5 then
    for s = 6, #ARGV, 1000 do
      redis.call('LPUSH', KEYS[5], unpack(ARGV, s, math.min(s + 999, #ARGV)))
    end
    redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]) - 1)
    redis.call('HINCRBY', KEYS[4], 'failures', #ARGV - 5)
    local by_error = {}
    for s = 6, #ARGV do
      local ok, entry = pcall(cjson.decode, ARGV[s])
      local name = ok and type(entry) == 'table' and entry['error'] or nil
      if type(name) ~= 'string' or #name == 0 or #name > 64 then name = '_unknown' end
      by_error[name] = (by_error[name] or 0) + 1
    end
    for name, count in pairs(by_error) do
      if redis.call('HEXISTS', KEYS[6], name) == 0 and redis.call('HLEN', KEYS[6]) >= 64 then name = '_other' end
      redis.call('HINCRBY', KEYS[6], name, count)
    end
  end
end
return {1, version, restored}
