#!lua flags=allow-oom
-- Gives unacknowledged messages back to their queues: for each, if it is still recorded as
-- unacknowledged with the same time taken (nobody acked, restored or took it again meanwhile),
-- its records go and the message is pushed back, in one atomic step. Being one script, it needs
-- no mutex: kombu guards its restore with a lock key that outlives a Redis crash (up to 5 minutes
-- without redelivery), and pushes and forgets in separate transactions per message.
--
-- Two callers (worker/consume/redelivery.py says which ending counts as a delivery):
-- * the sweep of messages whose worker went away (taken more than the visibility timeout ago):
--   that delivery ended with no verdict, and its count stays;
-- * a give-back by the live worker that holds the message (a Redis fault under its job, a warm
--   shutdown, a lost connection): not a delivery after all, so its count is taken back here, in
--   the same step, and cannot be left behind by a crash between two commands.
--
-- KEYS[1]  unacked_index, KEYS[2] unacked, KEYS[3] deliveries, KEYS[4] first_taken (see fetch.lua)
-- KEYS[5..] the queue lists the messages go back to
-- ARGV[1]  '1': a give-back, the delivery count goes down by one; '0': a sweep, it stays
-- ARGV[2]  'R': push at the consuming end (first in line); 'L': at the far end (last in line)
-- ARGV[3..] per message: delivery tag, its score as read, the message text to push, the number
--          of lists k, then k indexes into KEYS (5 = KEYS[5]); k = 0 only forgets a record
--          without a message (an index entry left alone)
-- Returns how many messages went back.
local undo = ARGV[1] == '1'
local far = ARGV[2] == 'L'
local back = 0
local i = 3
while i <= #ARGV do
  local tag, score, text, k = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local now = redis.call('ZSCORE', KEYS[1], tag)
  if now and tonumber(now) == tonumber(score) then
    redis.call('ZREM', KEYS[1], tag)
    redis.call('HDEL', KEYS[2], tag)
    -- Its age keeps running from its first take (an earlier one, if it came back before).
    if k > 0 then redis.call('HSETNX', KEYS[4], tag, now) end
    if undo and redis.call('HINCRBY', KEYS[3], tag, -1) <= 0 then redis.call('HDEL', KEYS[3], tag) end
    for j = 1, k do
      -- The command is written out, not chosen at run time: a proxy routes by reading it.
      if far then
        redis.call('LPUSH', KEYS[tonumber(ARGV[i + 3 + j])], text)
      else
        redis.call('RPUSH', KEYS[tonumber(ARGV[i + 3 + j])], text)
      end
    end
    if k > 0 then back = back + 1 end
  end
  i = i + 4 + k
end
return back
