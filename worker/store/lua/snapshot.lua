-- snapshot.lua: copies a model's checkpoint to a snapshot, keeping the last K.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the list of snapshot versions (newest first)
-- KEYS[3]  the evaluation ring (copied into the snapshot as eval_ring)
-- ARGV[1]  the snapshot hash prefix (itrain:{m}:snap:), the version is appended
-- ARGV[2]  K, how many snapshots to keep          ARGV[3]  now (epoch seconds)
--
-- The copy is of one checkpoint, read and written in one script: weights never without their
-- version and step. A version already snapshotted is not copied again.
-- Then the guard's reference (worker.engine.guard) is made again from the kept snapshots: the
-- lowest guard_loss measured under the model's current guard (its window and epoch, 'W:E'), as
-- 'loss version'.
-- Returns the snapshotted version, or false when the model has no checkpoint.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local version = redis.call('HGET', KEYS[1], 'version')
local key = ARGV[1] .. version
if redis.call('EXISTS', key) == 1 then return tonumber(version) end
redis.call('HSET', key, unpack(fields))
redis.call('HSET', key, 'snapshot_at', ARGV[3])
local ring = redis.call('GET', KEYS[3])
if ring then redis.call('HSET', key, 'eval_ring', ring) end
redis.call('LPUSH', KEYS[2], version)
local keep = tonumber(ARGV[2])
while redis.call('LLEN', KEYS[2]) > keep do
  redis.call('DEL', ARGV[1] .. redis.call('RPOP', KEYS[2]))
end
local guard = redis.call('HGET', KEYS[1], 'guard')
local gen = redis.call('HGET', KEYS[1], 'gen')
local best, best_text = nil, nil
if guard then
  local window, epoch = string.match(guard, '^(%S+) %S+ (%S+)$')
  local baseline = (window or '') .. ':' .. (epoch or '')
  for _, sv in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local g = redis.call('HMGET', ARGV[1] .. sv, 'guard_loss', 'gen')
    local loss, w = string.match(g[1] or '', '^(%S+) (%S+)$')
    if loss and w == baseline and g[2] == gen and (best == nil or tonumber(loss) < best) then
      best, best_text = tonumber(loss), loss .. ' ' .. sv
    end
  end
end
if best_text then redis.call('HSET', KEYS[1], 'guard_ref', best_text) else redis.call('HDEL', KEYS[1], 'guard_ref') end
return tonumber(version)
