-- How fast a queue's messages are taken, by all its pool fetchers together
-- (worker/consume/pool_fetch.py). A fetcher that counted only what it took would see its share of
-- the stream: with two fetchers busy in turn, each saw half the rate, and a stream fast enough to
-- gather (worker/consume/fetch_window.py) never opened a window (measured: 2,284 pool jobs for
-- 8,000 events at 1,000 a second sent in linger batches, 3.5 events a job).
--
-- KEYS[1]: the queue's tally, a hash of ARGV[3] + 1 slots, each "bucket:count" (a ring: a bucket
--          is ARGV[2] ms of Redis's clock).
-- ARGV[1]: messages the asking fetcher took since it last told; ARGV[2]: a bucket's width, ms;
--          ARGV[3]: the buckets remembered before the current one.
-- Returns {messages taken in the buckets remembered and the current one, the ms they span}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local width = tonumber(ARGV[2])
local remembered = tonumber(ARGV[3])
local bucket = math.floor(now / width)
local slot = bucket % (remembered + 1)
local told = tonumber(ARGV[1])
local total = 0
local stored = redis.call('HGETALL', KEYS[1])
for i = 1, #stored, 2 do
  local b, count = string.match(stored[i + 1], '^(%d+):(%d+)$')
  b, count = tonumber(b), tonumber(count)
  if b and b >= bucket - remembered and b <= bucket then
    total = total + count
    if tonumber(stored[i]) == slot then told = told + count end
  end
end
if tonumber(ARGV[1]) > 0 then
  redis.call('HSET', KEYS[1], slot, bucket .. ':' .. told)
  total = total + tonumber(ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], width * (remembered + 2))
return {total, remembered * width + (now - bucket * width)}
