-- Writes job results as Celery's Redis backend does (SET celery-task-meta-<id> EX ttl, then a
-- PUBLISH on the same name, which wakes a waiting AsyncResult.get()), with our precedence rule:
--   * a result is write-once: the first terminal result (SUCCESS, FAILURE, REVOKED) stands;
--   * except that "trained" replaces an earlier FAILURE, "skipped" or "duplicate" of the same
--     event (or of an unknown one): it states a fact about the weights;
--   * nothing replaces "trained", and a write for a different event than the stored one is
--     refused (a forged message cannot steal another job's result);
--   * a non-terminal state (STARTED, RETRY) is replaced by any result.
-- A chunk's result (flag "c", producer.chunks) is written if absent; when one is there already,
-- both go back to the caller, which merges them event by event (a trained entry replaces a lesser
-- one) and writes the merge with flag "r": set only if the stored value is still the one it read.
-- KEYS[k]  the result key of the k-th result (celery-task-meta-<id>). Results of one batch have
--          unrelated ids, so the keys hash to many Redis Cluster slots: every one is declared
--          here all the same, as Redis requires of a script.
-- ARGV[1]  ttl
-- ARGV[2]  a guard: "" for none, or the commit id a checkpoint must hold for anything to be
--          written. Then KEYS[1] is that checkpoint (its hash, field "cid") and the results'
--          keys start at KEYS[2]. The results of a batch ride in its commit's round trip so
--          (worker.training.trainer): written only if that commit landed.
-- then     a (meta json, X, flag) triple for each result key in order, where flag is "1"
--          (trained) or "0" (any other result of one event; X is its event id or ""), "c" (a
--          chunk's result; X unused) or "r" (replace a chunk's result; X is the value it must
--          still hold).
-- Returns {number of results written, then (key, stored value, our value) of each chunk met};
-- {-1} when the guard's checkpoint does not hold its commit id (nothing written).

local function replaceable(old, event, trained)
  local ok, meta = pcall(cjson.decode, old)
  if not ok or type(meta) ~= 'table' then return false end  -- not a result of ours: leave it
  local status = meta['status']
  if status ~= 'SUCCESS' and status ~= 'FAILURE' and status ~= 'REVOKED' then return true end
  if not trained then return false end
  local result = meta['result']
  local old_event = meta['event_id']
  if type(result) == 'table' then
    if status == 'SUCCESS' and result['status'] == 'trained' then return false end
    -- A SUCCESS names its event in its result; a FAILURE in a top-level "event_id".
    if type(old_event) ~= 'string' then old_event = result['event_id'] end
  end
  return type(old_event) ~= 'string' or old_event == event
end

local function is_chunk(old)
  local ok, meta = pcall(cjson.decode, old)
  return ok and type(meta) == 'table' and type(meta['result']) == 'table' and meta['result']['ids'] ~= nil
end

local ttl = ARGV[1]
local written = 0
local met = {}

local function publish(key, value)
  redis.call('PUBLISH', key, value)
  written = written + 1
end

local function write(key, value, x, flag)
  if flag == 'r' then
    if redis.call('GET', key) == x then
      redis.call('SET', key, value, 'EX', ttl)
      publish(key, value)
    end
    return
  end
  -- One command in the common case: set if absent, else hand back what is there.
  local old = redis.pcall('SET', key, value, 'NX', 'GET', 'EX', ttl)
  if type(old) == 'table' and old['err'] then
    -- A key of another type under a result name is not ours to replace; any other error (OOM,
    -- READONLY) is Redis's, and goes back to the caller.
    if string.sub(old['err'], 1, 9) ~= 'WRONGTYPE' then return redis.error_reply(old['err']) end
    return
  end
  if not old then
    publish(key, value)
  elseif flag == 'c' then
    table.insert(met, key)
    table.insert(met, old)
    table.insert(met, value)
  elseif not is_chunk(old) and replaceable(old, x, flag == '1') then
    -- (One event's result never replaces a chunk's: a message naming a chunk's id.)
    redis.call('SET', key, value, 'EX', ttl)
    publish(key, value)
  end
end

local first = 1
if ARGV[2] ~= '' then
  if redis.call('HGET', KEYS[1], 'cid') ~= ARGV[2] then return {-1} end
  first = 2
end
for k = first, #KEYS do
  local i = 3 * (k - first) + 3
  local err = write(KEYS[k], ARGV[i], ARGV[i + 1], ARGV[i + 2])
  if err then return err end
end
return {written, unpack(met)}
