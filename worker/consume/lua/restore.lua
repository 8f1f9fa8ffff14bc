#!lua flags=allow-oom
-- Gives messages whose worker went away back to their queues: for each, if it is still recorded
-- as unacknowledged with the same time taken (nobody acked or restored it meanwhile), its records
-- go and the message is pushed at the consuming end, in one atomic step. Being one script, it
-- needs no mutex: kombu guards its restore with a lock key that outlives a Redis crash (up to 5
-- minutes without redelivery), and pushes and forgets in separate transactions per message.
--
-- KEYS[1]  unacked_index, KEYS[2] unacked (see fetch.lua)
-- KEYS[3..] the queue lists the messages go back to
-- ARGV     per message: delivery tag, its score as read, the message text to push, the number of
--          lists k, then k indexes into KEYS (3 = KEYS[3]); k = 0 only forgets a record without
--          a message (an index entry left alone)
-- Returns how many messages went back.
local back = 0
local i = 1
while i <= #ARGV do
  local tag, score, text, k = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local now = redis.call('ZSCORE', KEYS[1], tag)
  if now and tonumber(now) == tonumber(score) then
    redis.call('ZREM', KEYS[1], tag)
    redis.call('HDEL', KEYS[2], tag)
    for j = 1, k do
      redis.call('RPUSH', KEYS[tonumber(ARGV[i + 3 + j])], text)
    end
    if k > 0 then back = back + 1 end
  end
  i = i + 4 + k
end
return back
