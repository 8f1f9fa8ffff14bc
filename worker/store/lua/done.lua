-- done.lua: which events are already in the weights (have a marker in one of the slots).
--
-- KEYS[1...]  the marker hashes to look in, one per slot (producer.keys.marker_slots)
-- ARGV[1...]  the events' marker fields (producer.keys.marker_field of each event id)
--
-- Returns one byte per event, in order: '1' when a marker was found, else '0'; when any was
-- found, {those bytes, then each found marker's value, in event order} (a redelivered job reads
-- in it which result trained its event: worker.store.markers). The fields cross
-- the network once instead of once per slot, and slots that do not exist (most of the window
-- while it fills, or after a quiet spell) cost one EXISTS. Fields are asked a thousand at a time
-- (Lua's unpack has a limit near 8,000 values).
local n = #ARGV
local found = {}
local marks = {}
for i = 1, n do found[i] = '0' end
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    for s = 1, n, 1000 do
      local values = redis.call('HMGET', key, unpack(ARGV, s, math.min(s + 999, n)))
      for j = 1, #values do
        if values[j] and found[s + j - 1] == '0' then
          found[s + j - 1] = '1'
          marks[s + j - 1] = values[j]
        end
      end
    end
  end
end
local flags = table.concat(found)
if next(marks) == nil then return flags end
local reply = {flags}
for i = 1, n do
  if marks[i] then reply[#reply + 1] = marks[i] end
end
return reply
