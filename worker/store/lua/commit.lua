-- commit.lua: the fenced commit of a trained batch.
--
-- KEYS[1]  the checkpoint hash      KEYS[2]  the stats hash      KEYS[3]  the per-action counts
-- KEYS[4]  the history list         KEYS[5]  the dead-letter list     KEYS[6]  the evaluation ring
-- KEYS[7], KEYS[8], KEYS[9]  the event markers' hashes of slots s0, s0 + 1 and s0 + 2 (s0 is
--          ARGV[9]) of the checkpoint's generation (producer.keys.ModelKeys.done)
-- KEYS[10] the latency histograms' hash    KEYS[11] the dead letters' counts by error type
-- ARGV[1]  expected tag (version:cid, as read under the lock)
-- ARGV[2]  the new weights (raw float64 bytes; '' when nothing trained)
-- ARGV[3]  n, the number of trained events
-- ARGV[4]  loss_last        ARGV[5]  loss_ema         ARGV[6]  now (epoch seconds)
-- ARGV[7]  history_max      ARGV[8]  the de-duplication window, seconds (ITRAIN_DEDUPE_TTL)
-- ARGV[9]  s0, the slot of KEYS[7]
--          Markers are compact: one hash per slot of time (a quarter of the window, as
--          producer.keys.slot_seconds), marker field -> 'step:digest' (worker.store.markers),
--          expiring a window after its slot
--          ends; a reader looks in every slot of the last window (producer.keys.marker_slots).
--          The slot is taken from Redis's clock, the one that expires the key: every marker
--          lives at least the window, whatever the worker's clock says. The caller names the
--          hashes of the slots around its own clock's (a script may touch only keys declared in
--          KEYS); when Redis's slot is none of them, nothing is written and the reply names it.
-- ARGV[10] dead_max         ARGV[11] n_actions        ARGV[12] n_history
-- ARGV[13] n_dead           ARGV[14] the new cid
-- ARGV[15] the online evaluation's JSON (producer.evaluation)    ARGV[16] eval_wn
-- ARGV[17] eval_cap         ARGV[18] guard_loss ('loss W:E', '' when none)
-- ARGV[19] n_segments, the ring's changed runs
-- ARGV[20...] then n marker fields (producer.keys.marker_field of each event id), n digests of
--          the result ids that trained them (worker.store.markers.result_digest; '' when none:
--          the marker holds the step alone), n_actions
--          (name, count) pairs, n_history entries (newest last), n_dead entries and n_segments
--          (byte offset, bytes) pairs of evaluation records; then k and k (field, increment)
--          pairs of the latency histograms (worker.store.latency: a field ending in ':sum' is a
--          float sum, any other a bucket count).
--
-- It lands only if the checkpoint is still the one read under the lock (same tag): a holder
-- whose lock expired while it was paused finds another checkpoint and is refused, instead of
-- overwriting newer weights. Weights, version, step, the event markers, history, counters and
-- dead letters are written together; lists are pushed a thousand at a time (Lua's unpack has a
-- limit near 8,000 values).
--
-- Returns {1, new version, step before} when it landed, {0, current version or -1, 0} when refused,
-- {-1, Redis's slot, 0} when that slot's marker hash is not among KEYS[7..9] (nothing written).
local v = redis.call('HGET', KEYS[1], 'version')
if not v or v .. ':' .. (redis.call('HGET', KEYS[1], 'cid') or '') ~= ARGV[1] then
  return {0, v or -1, 0}
end
local n = tonumber(ARGV[3])
local window = tonumber(ARGV[8])
local width = math.max(1, math.ceil(window / 4))
local slot = math.floor(tonumber(redis.call('TIME')[1]) / width)
local offset = slot - tonumber(ARGV[9])
if n > 0 and (offset < 0 or offset > 2) then return {-1, slot, 0} end
local marker = KEYS[7 + offset]
local function push(key, first, count)
  for s = first, first + count - 1, 1000 do
    redis.call('LPUSH', key, unpack(ARGV, s, math.min(s + 999, first + count - 1)))
  end
end
local n_actions, n_hist, n_dead = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local step0 = tonumber(redis.call('HGET', KEYS[1], 'step'))
local newv = tonumber(v)
local i = 20
if n > 0 then
  newv = newv + 1
  redis.call('HSET', KEYS[1], 'params', ARGV[2], 'version', newv, 'cid', ARGV[14], 'step', step0 + n,
             'loss_last', ARGV[4], 'loss_ema', ARGV[5], 'updated_at', ARGV[6],
             'eval', ARGV[15], 'eval_wn', ARGV[16], 'eval_cap', ARGV[17], 'guard_loss', ARGV[18])
  -- One HSET per thousand markers (a call per marker costs Redis more than the marker itself).
  for s = 1, n, 1000 do
    local pairs = {}
    for j = s, math.min(s + 999, n) do
      local digest = ARGV[i + n]
      pairs[#pairs + 1] = ARGV[i]
      pairs[#pairs + 1] = digest == '' and (step0 + j) or ((step0 + j) .. ':' .. digest)
      i = i + 1
    end
    redis.call('HSET', marker, unpack(pairs))
  end
  i = i + n
  redis.call('EXPIREAT', marker, (slot + 1) * width + window)
  redis.call('HINCRBY', KEYS[2], 'interactions', n)
end
for j = 1, n_actions do
  -- At most 256 action names are counted apiece (labelled events may name any action).
  local name = ARGV[i]
  if redis.call('HEXISTS', KEYS[3], name) == 0 and redis.call('HLEN', KEYS[3]) >= 256 then
    name = '_other'
  end
  redis.call('HINCRBY', KEYS[3], name, ARGV[i + 1])
  i = i + 2
end
if n_hist > 0 then
  push(KEYS[4], i, n_hist)
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
  i = i + n_hist
end
if n_dead > 0 then
  push(KEYS[5], i, n_dead)
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[10]) - 1)
  redis.call('HINCRBY', KEYS[2], 'failures', n_dead)
  -- Their error types, counted with them (at most 64 names; the rest as '_other').
  local by_error = {}
  for s = i, i + n_dead - 1 do
    local ok, entry = pcall(cjson.decode, ARGV[s])
    local name = ok and type(entry) == 'table' and entry['error'] or nil
    if type(name) ~= 'string' or #name == 0 or #name > 64 then name = '_unknown' end
    by_error[name] = (by_error[name] or 0) + 1
  end
  for name, count in pairs(by_error) do
    if redis.call('HEXISTS', KEYS[11], name) == 0 and redis.call('HLEN', KEYS[11]) >= 64 then name = '_other' end
    redis.call('HINCRBY', KEYS[11], name, count)
  end
  i = i + n_dead
end
for j = 1, tonumber(ARGV[19]) do
  redis.call('SETRANGE', KEYS[6], tonumber(ARGV[i]), ARGV[i + 1])
  i = i + 2
end
-- The trained events' latency histograms (a few buckets and two sums per commit).
if ARGV[i] then
  for j = i + 1, i + 2 * tonumber(ARGV[i]), 2 do
    if string.sub(ARGV[j], -4) == ':sum' then
      redis.call('HINCRBYFLOAT', KEYS[10], ARGV[j], ARGV[j + 1])
    else
      redis.call('HINCRBY', KEYS[10], ARGV[j], ARGV[j + 1])
    end
  end
end
return {1, newv, step0}
