-- Notes when a worker first saw each queue's head message, for a head without an enqueue-time
-- header (a message from another language): the queue's age is counted from then
-- (worker.consume.queue_heads, itrain exporter). A head with the header, or an empty queue,
-- needs no note, and any old one is dropped.
--
-- KEYS[1]  the heads hash: queue -> '<sha1 of the head message> <unix time, Redis's clock>'
-- KEYS[2..] the queue lists
-- ARGV[1]  the enqueue-time header's name as it appears in a message's JSON text, quoted
-- ARGV[2..] the queue name of each list in KEYS[2..] (the hash's field)
--
-- The head is the end workers take next (RPOP: index -1). It is read, not taken, and only
-- searched for the header's name (no JSON decoding): a head of a few hundred KB costs tens of
-- microseconds. Writes only when a new head without the header appears.
--
-- Returns the number of notes written.
local written = 0
local now = nil
for k = 2, #KEYS do
  local field = ARGV[k]
  local raw = redis.call('LINDEX', KEYS[k], -1)
  if not raw or string.find(raw, ARGV[1], 1, true) then
    redis.call('HDEL', KEYS[1], field)
  else
    local sha = redis.sha1hex(raw)
    local seen = redis.call('HGET', KEYS[1], field)
    if not seen or string.sub(seen, 1, 40) ~= sha then
      now = now or redis.call('TIME')
      redis.call('HSET', KEYS[1], field, sha .. ' ' .. now[1] .. '.' .. string.format('%06d', tonumber(now[2])))
      written = written + 1
    end
  end
end
return written
