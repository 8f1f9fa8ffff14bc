#!lua flags=allow-oom
-- Forgets the unacknowledged records of acknowledged messages, each only while the record is
-- still the acknowledging delivery's own: recorded with the time that delivery took it. A message
-- keeps its delivery tag when it is redelivered, so a worker cut off from Redis for longer than
-- the visibility timeout acks under the same tag as the worker that holds the message now; an
-- unconditional ack would remove that worker's record, and a crash of that worker would then lose
-- the message. A record with another time (taken again), or none (swept back, not yet taken
-- again; or acked by its new holder), is left as it is, with its delivery count and first take.
-- allow-oom: acking frees memory, and a full Redis drains by acking.
--
-- KEYS[1]  unacked_index, KEYS[2] unacked, KEYS[3] deliveries, KEYS[4] first_taken (see fetch.lua)
-- ARGV     pairs: delivery tag, the score its delivery was recorded with
-- Returns how many records were forgotten.
local gone = 0
for i = 1, #ARGV - 1, 2 do
  local tag = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], tag)
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], tag)
    redis.call('HDEL', KEYS[2], tag)
    redis.call('HDEL', KEYS[3], tag)
    redis.call('HDEL', KEYS[4], tag)
    gone = gone + 1
  end
end
return gone
