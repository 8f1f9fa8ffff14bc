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
-- ARGV     n delivery tags, then the n scores their deliveries were recorded with, in the same
--          order (the caller sends 500 tags at most: within Lua's unpack limit)
-- Returns how many records were forgotten.
local n = #ARGV / 2
-- One read for all of them, one removal per key: a flush costs Redis little more than the plain
-- removals did.
local scores = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, 1, n))
local mine = {}
for i = 1, n do
  if scores[i] and tonumber(scores[i]) == tonumber(ARGV[n + i]) then mine[#mine + 1] = ARGV[i] end
end
if #mine == 0 then return 0 end
redis.call('ZREM', KEYS[1], unpack(mine))
redis.call('HDEL', KEYS[2], unpack(mine))
redis.call('HDEL', KEYS[3], unpack(mine))
redis.call('HDEL', KEYS[4], unpack(mine))
return #mine
