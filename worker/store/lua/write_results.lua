-- Writes job results as Celery's Redis backend does (SET celery-task-meta-<id> EX ttl, then a
-- PUBLISH on the same name, which wakes a waiting AsyncResult.get()), with our precedence rule:
--   * a result is write-once: the first terminal result (SUCCESS, FAILURE, REVOKED) stands;
--   * except that "trained" replaces an earlier FAILURE, "skipped" or "duplicate" of the same
--     event (or of an unknown one): it states a fact about the weights;
--   * nothing replaces "trained", and a write for a different event than the stored one is
--     refused (a forged message cannot steal another job's result);
--   * a non-terminal state (STARTED, RETRY) is replaced by any result.
-- KEYS: none (each result key is in ARGV: results of one batch have unrelated ids).
-- ARGV: ttl, then (key, meta json, event id or "", trained "1"/"0") quads.
-- Returns the number of results written.

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
    -- Results written before "event_id" was a top-level field carry it in the result.
    if type(old_event) ~= 'string' then old_event = result['event_id'] end
  end
  return type(old_event) ~= 'string' or old_event == event
end

local ttl = ARGV[1]
local written = 0
for i = 2, #ARGV, 4 do
  local key, value = ARGV[i], ARGV[i + 1]
  -- One command in the common case: set if absent, else hand back what is there.
  local old = redis.pcall('SET', key, value, 'NX', 'GET', 'EX', ttl)
  if type(old) == 'table' and old['err'] then
    -- A key of another type under a result name is not ours to replace; any other error (OOM,
    -- READONLY) is Redis's, and goes back to the caller.
    if string.sub(old['err'], 1, 9) ~= 'WRONGTYPE' then return redis.error_reply(old['err']) end
  else
    local write = not old
    if old and replaceable(old, ARGV[i + 2], ARGV[i + 3] == '1') then
      redis.call('SET', key, value, 'EX', ttl)
      write = true
    end
    if write then
      redis.call('PUBLISH', key, value)
      written = written + 1
    end
  end
end
return written
