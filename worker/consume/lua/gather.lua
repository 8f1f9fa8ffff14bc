-- One worker at a time gathers a queue's messages through a fetch window
-- (worker/consume/fetch_window.py): every idle worker is woken by the same message, and two
-- workers each gathering half of what comes pay twice the fetches, pool jobs and locks.
--
-- KEYS[1]: the queue's gather key. ARGV[1]: the asking worker's name; ARGV[2]: the window, ms.
-- Returns -1 when the asking worker now gathers (the key is its own for the window), else the
-- milliseconds left of the window another worker holds (0 when it is ending).
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
  return -1
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  return 0
end
return left
