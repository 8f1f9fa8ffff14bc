-- One worker at a time gathers a queue's messages through a fetch window
-- (worker/consume/fetch_window.py): every idle worker is woken by the same message, and two
-- workers each gathering half of what comes pay twice the fetches, pool jobs and locks.
--
-- Windows tile time: a window ends at most its length after the last one ended, so a message
-- that came between two windows (while no worker was free to gather, or while the next one was
-- being asked for) waits no longer than the window for its fetch.
--
-- KEYS[1]: the queue's gather key (the gathering worker's name, expiring with its window).
-- KEYS[2]: when the queue's last window ends (ms, Redis's clock).
-- ARGV[1]: the asking worker's name; ARGV[2]: the window it asks for, ms.
-- Returns {1, ms}: the asking worker gathers for ms more (0: fetch now); or {0, ms}: another
-- worker gathers for ms more.
local left = redis.call('PTTL', KEYS[1])
if left > 0 then
  return {0, left}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window = tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[2]))
if last and now > last then
  window = math.max(0, window - (now - last))
end
if window > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', window)
end
redis.call('SET', KEYS[2], now + window, 'PX', 60000)
return {1, window}
