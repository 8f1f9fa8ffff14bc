#!lua flags=allow-oom
-- Takes up to n messages off a queue and records each one as unacknowledged, in one atomic step:
-- there is no instant at which a message is neither on the queue nor recorded, so a worker or a
-- Redis that dies at any point loses nothing (an unacknowledged message returns after the
-- visibility timeout). allow-oom: the script frees what it records, and consuming is how a full
-- Redis drains; refusing it would stall every worker until an operator steps in.
--
-- KEYS[1]  unacked_index  zset: delivery tag -> time taken (kombu's layout)
-- KEYS[2]  unacked        hash: delivery tag -> [message, exchange, routing key] (kombu's layout)
-- KEYS[3]  deliveries     hash: delivery tag -> deliveries that counted, kept until the message is
--                         acked (a give-back by a live worker takes its count back: restore.lua,
--                         giveback.lua)
-- KEYS[4]  first_taken    hash: delivery tag -> when it was first taken, for a message taken before
--                         (written when it is given back or swept back, kept until it is acked):
--                         how old a message is, however often it came back
-- KEYS[5]  rejected       list: a short record of each item that is not a message envelope
-- KEYS[6..] the queue lists to take from: for each priority level in order, one list per queue
--          (k lists a level, the queues in the same order at every level)
-- ARGV[1]  n              how many messages at most
-- ARGV[2]  now            unix time, seconds (the score kombu's visibility timeout compares)
-- ARGV[3]  max_bytes      an item longer than this is refused before it is parsed
-- ARGV[4]  rejected_max   the rejected list keeps this many records
-- ARGV[5]  queue_bytes    a queue stops giving once it has given this many bytes in this call
--                         (one message at least)
-- ARGV[6]  k              how many queues
-- ARGV[7..6+k]            how many messages each queue may give at most (its free prefetch share)
-- ARGV[7+k..] the queue name of each list in KEYS[6..] (the routing key when a message has none)
--
-- Fair between queues: within a priority level, n is shared among the queues that still have
-- messages (and room), in rounds, so a flooded queue never takes the whole fetch from a queue
-- with a few messages waiting. queue_bytes bounds what a queue of large messages gives at once:
-- 50 train_many chunks (~2.4 MB) held Redis for 10-35 ms here, and the worker's main process
-- for as long again to read them, while another queue's lone event waited behind both.
--
-- Returns a flat array, five values per item taken: the index of its list (1 = KEYS[6]), its
-- delivery tag ('' when refused), its delivery count (0 when refused), when it was first taken
-- (0 when refused), then the message text as it was on the queue, or the reason it was refused.
local n = tonumber(ARGV[1])
local now = ARGV[2]
local max_bytes = tonumber(ARGV[3])
local out = {}
local taken = 0

local function refuse(reason, size)
  redis.call('LPUSH', KEYS[5], cjson.encode({reason = reason, bytes = size, at = tonumber(now)}))
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[4]) - 1)
  return reason
end

-- The delivery tag, exchange and routing key of an envelope, or nil and the reason it is not one.
local function parse(raw, queue)
  if #raw > max_bytes then
    return nil, 'envelope of ' .. #raw .. ' bytes is larger than the limit of ' .. max_bytes
  end
  local ok, msg = pcall(cjson.decode, raw)
  if not ok then
    -- cjson refuses surrogate escapes ("\ud800"), which JSON allows and the worker reports as
    -- an invalid id. Only the delivery fields are needed here: read them from a copy with every
    -- surrogate escape replaced (the worker checks that it reads the same delivery tag).
    ok, msg = pcall(cjson.decode, (string.gsub(raw, '\\u[dD][89a-fA-F]%x%x', '\\ufffd')))
  end
  if not ok or type(msg) ~= 'table' then return nil, 'not a JSON object' end
  local props = msg['properties']
  if type(props) ~= 'table' then return nil, 'no properties object' end
  local tag = props['delivery_tag']
  if type(tag) ~= 'string' or #tag == 0 or #tag > 255 then
    return nil, 'no delivery_tag string of 1 to 255 bytes'
  end
  local ex, rk = '', queue
  local info = props['delivery_info']
  if type(info) == 'table' then
    if type(info['exchange']) == 'string' then ex = info['exchange'] end
    if type(info['routing_key']) == 'string' then rk = info['routing_key'] end
  end
  return tag, ex, rk
end

local queue_bytes = tonumber(ARGV[5])
local k = tonumber(ARGV[6])
local caps = {}
-- Bytes each queue has given in this call (over every priority level).
local given = {}
for i = 1, k do
  caps[i] = tonumber(ARGV[6 + i])
  given[i] = 0
end

-- Takes up to want messages off list number idx (1 = KEYS[6]) of queue number i and records them,
-- one at a time, until the queue has given queue_bytes; returns how many.
local function take(idx, i, want)
  local got = 0
  while got < want and given[i] < queue_bytes do
    local raw = redis.call('RPOP', KEYS[5 + idx])
    if not raw then break end
    got = got + 1
    given[i] = given[i] + #raw
    taken = taken + 1
    local tag, ex, rk = parse(raw, ARGV[6 + k + idx])
    if tag then
      -- Built from the original text: the message is stored exactly as it arrived.
      redis.call('ZADD', KEYS[1], now, tag)
      redis.call('HSET', KEYS[2], tag, '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      local count = redis.call('HINCRBY', KEYS[3], tag, 1)
      -- Written only when a message is given back (restore.lua, giveback.lua): until then its
      -- first take is this one.
      local first = redis.call('HGET', KEYS[4], tag) or now
      out[#out + 1] = idx
      out[#out + 1] = tag
      out[#out + 1] = count
      out[#out + 1] = first
      out[#out + 1] = raw
    else
      out[#out + 1] = idx
      out[#out + 1] = ''
      out[#out + 1] = 0
      out[#out + 1] = 0
      out[#out + 1] = refuse(ex, #raw)
    end
  end
  return got
end

local levels = math.floor((#KEYS - 5) / k)
for level = 0, levels - 1 do
  if taken >= n then break end
  local open = {}
  for i = 1, k do
    if caps[i] > 0 and given[i] < queue_bytes then open[#open + 1] = i end
  end
  -- Rounds: each open queue gives its share of what is left; a queue that gave less than asked
  -- is empty (at this level), at its cap or at its bytes, and drops out.
  while taken < n and #open > 0 do
    local share = math.max(1, math.floor((n - taken) / #open))
    local still = {}
    for _, i in ipairs(open) do
      if taken >= n then break end
      local want = math.min(share, caps[i], n - taken)
      local got = take(level * k + i, i, want)
      caps[i] = caps[i] - got
      if got == want and caps[i] > 0 and given[i] < queue_bytes then still[#still + 1] = i end
    end
    open = still
  end
end
return out
