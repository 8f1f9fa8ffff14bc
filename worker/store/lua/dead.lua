-- dead.lua: dead letters for a model if it exists, else for the unrouted list, so hostile
-- messages naming random models cannot create keys.
--
-- KEYS[1]  the set of models        KEYS[2]  the model's dead-letter list
-- KEYS[3]  the model's stats hash   KEYS[4]  the unrouted dead-letter list
-- ARGV[1]  the model name           ARGV[2]  the most entries a list keeps
-- ARGV[3...] the entries
--
-- Returns 1.
local dead, stats = KEYS[2], KEYS[3]
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then dead, stats = KEYS[4], false end
for s = 3, #ARGV, 1000 do
  redis.call('LPUSH', dead, unpack(ARGV, s, math.min(s + 999, #ARGV)))
end
redis.call('LTRIM', dead, 0, tonumber(ARGV[2]) - 1)
if stats then redis.call('HINCRBY', stats, 'failures', #ARGV - 2) end
return 1
