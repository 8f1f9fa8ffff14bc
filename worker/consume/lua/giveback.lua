#!lua flags=allow-oom
-- Puts fetched messages that were never handed to the worker back at the consuming end of their
-- queue, first-fetched last so that it is consumed first again, and forgets their unacknowledged
-- records. Only messages still recorded go back: one already restored elsewhere is not doubled.
-- Their delivery count is taken back in the same step (they were never handed to the worker);
-- their first-taken time stays, so a message's age runs from when it was first taken.
--
-- KEYS[1]  unacked_index, KEYS[2] unacked, KEYS[3] deliveries (see fetch.lua)
-- KEYS[4..] the queue lists
-- ARGV     triples in the order fetched: index of the list (1 = KEYS[4]), delivery tag, message
-- Returns how many messages went back.
local back = 0
for i = #ARGV - 2, 1, -3 do
  local tag = ARGV[i + 1]
  if redis.call('HDEL', KEYS[2], tag) == 1 then
    redis.call('ZREM', KEYS[1], tag)
    -- Not a delivery after all.
    if redis.call('HINCRBY', KEYS[3], tag, -1) <= 0 then redis.call('HDEL', KEYS[3], tag) end
    redis.call('RPUSH', KEYS[3 + tonumber(ARGV[i])], ARGV[i + 2])
    back = back + 1
  end
end
return back
