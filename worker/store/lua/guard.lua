-- guard.lua: set, change or remove a model's guard, or resume a paused model.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the evaluation ring
-- ARGV[1]  'set' or 'resume'        ARGV[2]  the new checkpoint id (cid)
-- ARGV[3]  (set) the guard, 'W R', or '' to remove it; the script appends its epoch, one more
--          than the last guard's (a new baseline: worker/engine/guard.py)
-- ARGV[4]  (set) the evaluation window (ITRAIN_EVAL_WINDOW) for a model that has none yet
--
-- Run under the model's lock. Either way the evaluation window restarts (a new guard measures
-- from now; a resumed model must not trip again on the losses that tripped it) and the cid
-- changes, so every worker reads the new state. A new guard has no reference until the next
-- snapshot taken with its window full under its epoch (snapshot.lua); the window widens to the
-- guard's. A resume keeps the guard, its epoch and its reference.
-- Returns {1, was paused (1/0)} or {0, 'no-model'}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 'no-model'} end
local paused = redis.call('HEXISTS', KEYS[1], 'paused')
if ARGV[1] == 'resume' then
  redis.call('HDEL', KEYS[1], 'paused')
else
  redis.call('HDEL', KEYS[1], 'guard_ref')
  if ARGV[3] == '' then
    redis.call('HDEL', KEYS[1], 'guard')
  else
    local window = tonumber(string.match(ARGV[3], '^(%S+)'))
    local cap = tonumber(redis.call('HGET', KEYS[1], 'eval_cap') or ARGV[4])
    local old = redis.call('HGET', KEYS[1], 'guard')
    local epoch = (old and tonumber(string.match(old, '^%S+ %S+ (%S+)$')) or 0) + 1
    redis.call('HSET', KEYS[1], 'guard', ARGV[3] .. ' ' .. epoch, 'eval_cap', math.max(cap, window))
  end
end
redis.call('HSET', KEYS[1], 'cid', ARGV[2], 'eval_wn', 0)
redis.call('HDEL', KEYS[1], 'guard_loss')
redis.call('DEL', KEYS[2])
return {1, paused}
