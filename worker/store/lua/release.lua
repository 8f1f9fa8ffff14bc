-- release.lua: give a model's lock back only if it is still ours (compare and delete).
--
-- KEYS[1]  the lock (itrain:{model}:lock)
-- ARGV[1]  the holder's token
--
-- Returns 1 when the lock was ours and is gone, 0 when it had expired (another holder's lock is
-- left alone: the fenced commit already refused any write made after ours expired).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
