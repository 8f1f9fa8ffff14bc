-- snapshot.lua: copies a model's checkpoint to a snapshot, keeping the last K.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the list of snapshot versions (newest first)
-- KEYS[3]  the evaluation ring (copied into the snapshot as eval_ring)
-- KEYS[4]  the snapshot hash of the checkpoint's version (itrain:{m}:snap:<ARGV[3]>)
-- KEYS[5...] the snapshot hashes of the versions in the list, in its order (ARGV[4...])
-- ARGV[1]  K, how many snapshots to keep          ARGV[2]  now (epoch seconds)
-- ARGV[3]  the checkpoint's version, as the caller read it
-- ARGV[4...] the versions in the list, as the caller read it
--
-- A script may touch only the keys its caller declares, and the snapshots' names hold versions,
-- so the caller reads the version and the list first and names every hash this can touch; when
-- either has changed meanwhile, nothing is written and the caller reads them again.
-- The copy is of one checkpoint, read and written in one script: weights never without their
-- version and step. A version already snapshotted is not copied again.
-- Then the guard's reference (worker.engine.guard) is made again from the kept snapshots: the
-- lowest guard_loss measured under the model's current guard (its window and epoch, 'W:E'), as
-- 'loss version'.
-- Returns the snapshotted version, false when the model has no checkpoint, or -1 when the
-- version or the list is not what the caller read.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local version = redis.call('HGET', KEYS[1], 'version')
if version ~= ARGV[3] then return -1 end
local listed = redis.call('LRANGE', KEYS[2], 0, -1)
if #listed ~= #ARGV - 3 then return -1 end
for j, sv in ipairs(listed) do
  if sv ~= ARGV[3 + j] then return -1 end
end
if redis.call('EXISTS', KEYS[4]) == 1 then return tonumber(version) end
redis.call('HSET', KEYS[4], unpack(fields))
redis.call('HSET', KEYS[4], 'snapshot_at', ARGV[2])
local ring = redis.call('GET', KEYS[3])
if ring then redis.call('HSET', KEYS[4], 'eval_ring', ring) end
redis.call('LPUSH', KEYS[2], version)
-- The list and its hashes, newest first: the new snapshot, then those the caller read.
local versions, names = {version}, {KEYS[4]}
for j = 1, #listed do
  versions[j + 1], names[j + 1] = listed[j], KEYS[4 + j]
end
local keep = tonumber(ARGV[1])
while #names > keep do
  redis.call('RPOP', KEYS[2])
  versions[#versions] = nil
  redis.call('DEL', table.remove(names))
end
local guard = redis.call('HGET', KEYS[1], 'guard')
local gen = redis.call('HGET', KEYS[1], 'gen')
local best, best_text = nil, nil
if guard then
  local window, epoch = string.match(guard, '^(%S+) %S+ (%S+)$')
  local baseline = (window or '') .. ':' .. (epoch or '')
  for j, sv in ipairs(versions) do
    local g = redis.call('HMGET', names[j], 'guard_loss', 'gen')
    local loss, w = string.match(g[1] or '', '^(%S+) (%S+)$')
    if loss and w == baseline and g[2] == gen and (best == nil or tonumber(loss) < best) then
      best, best_text = tonumber(loss), loss .. ' ' .. sv
    end
  end
end
if best_text then redis.call('HSET', KEYS[1], 'guard_ref', best_text) else redis.call('HDEL', KEYS[1], 'guard_ref') end
return tonumber(version)
