-- snapshot.lua: copies a model's checkpoint to a snapshot, keeping the last K.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the list of snapshot versions (newest first)
-- ARGV[1]  the snapshot hash prefix (itrain:{m}:snap:), the version is appended
-- ARGV[2]  K, how many snapshots to keep          ARGV[3]  now (epoch seconds)
--
-- The copy is of one checkpoint, read and written in one script: weights never without their
-- version and step. A version already snapshotted is not copied again.
-- Returns the snapshotted version, or false when the model has no checkpoint.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local version = redis.call('HGET', KEYS[1], 'version')
local key = ARGV[1] .. version
if redis.call('EXISTS', key) == 1 then return tonumber(version) end
redis.call('HSET', key, unpack(fields))
redis.call('HSET', key, 'snapshot_at', ARGV[3])
redis.call('LPUSH', KEYS[2], version)
local keep = tonumber(ARGV[2])
while redis.call('LLEN', KEYS[2]) > keep do
  redis.call('DEL', ARGV[1] .. redis.call('RPOP', KEYS[2]))
end
return tonumber(version)
