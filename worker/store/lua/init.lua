-- init.lua: creates (or, with force, replaces) a model.
--
-- KEYS[1]  the set of models        KEYS[2]  the checkpoint hash     KEYS[3]  the stats hash
-- KEYS[4]  the per-action counts    KEYS[5]  the history list        KEYS[6]  the dead-letter list
-- KEYS[7]  the evaluation ring
-- ARGV[1]  the model name           ARGV[2]  '1' to replace an existing model, else '0'
-- ARGV[3...] the checkpoint's hash fields, as (name, value) pairs, without its version
--
-- The version keeps rising across a replacement, so a worker's cached copy of the old model can
-- never pass for the new one.
--
-- Returns {1, version} when written, {0, existing version} when the model exists and force is off.
local old = redis.call('HGET', KEYS[2], 'version')
if old and ARGV[2] ~= '1' then return {0, old} end
local version = (tonumber(old) or 0) + 1
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
-- A new generation: the old model's event markers (keyed by generation) no longer count.
redis.call('HSET', KEYS[2], 'version', version, 'gen', version, unpack(ARGV, 3))
redis.call('SADD', KEYS[1], ARGV[1])
return {1, version}
