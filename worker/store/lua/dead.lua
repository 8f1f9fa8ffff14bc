-- dead.lua: dead letters for a model if it exists, else for the unrouted list, so hostile
-- messages naming random models cannot create keys.
--
-- KEYS[1]  the set of models        KEYS[2]  the model's dead-letter list
-- KEYS[3]  the model's stats hash   KEYS[4]  the unrouted dead-letter list
-- KEYS[5]  the model's counts by error type     KEYS[6]  the unrouted counts by error type
-- ARGV[1]  the model name           ARGV[2]  the most entries a list keeps
-- ARGV[3...] the entries
--
-- Each entry's error type (its JSON "error", worker.outcome.dead_letter_entry) is counted with
-- it: at most 64 names, the rest as '_other' (the exporter's dead-letter rate by type).
--
-- Returns 1.
local dead, stats, errors = KEYS[2], KEYS[3], KEYS[5]
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then dead, stats, errors = KEYS[4], false, KEYS[6] end
for s = 3, #ARGV, 1000 do
  redis.call('LPUSH', dead, unpack(ARGV, s, math.min(s + 999, #ARGV)))
end
redis.call('LTRIM', dead, 0, tonumber(ARGV[2]) - 1)
if stats then redis.call('HINCRBY', stats, 'failures', #ARGV - 2) end
local by_error = {}
for s = 3, #ARGV do
  local ok, entry = pcall(cjson.decode, ARGV[s])
  local name = ok and type(entry) == 'table' and entry['error'] or nil
  if type(name) ~= 'string' or #name == 0 or #name > 64 then name = '_unknown' end
  by_error[name] = (by_error[name] or 0) + 1
end
for name, count in pairs(by_error) do
  if redis.call('HEXISTS', errors, name) == 0 and redis.call('HLEN', errors) >= 64 then name = '_other' end
  redis.call('HINCRBY', errors, name, count)
end
return 1
