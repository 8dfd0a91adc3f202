-- Commit one step of a user's record, all or nothing: the version check, the record's fields,
-- the sealed keys, the indexes, the schedule, the history and stream entries, and what rides
-- along only when the step applies (the caller's answer, arq jobs, the lock's release,
-- counters). One writer wins: a step that read another version commits nothing.
-- Runs after enqueue_function.lua, which defines enqueue().
--
-- KEYS: every key the step touches, in no fixed order; ARGV[1] names their positions.
-- ARGV: 1 the step (JSON, "op" below), then binary values the op points at by position (the
-- sealed values and the jobs' payloads: cjson cannot carry bytes).
-- op.keys, by name -> position in KEYS:
--   rec (record hash), hist (history list), seen (applied event ids), idx_from / idx_to (state
--   indexes left and entered), sched (refresh schedule), kids (ciphertexts per key id), stream
--   (transition stream), histidx (users by oldest history entry), outbox (tokens to revoke),
--   transitions (transition counters), tokens / revoke (the sealed keys);
--   when the step has them: sess_set / sess_drop (session lookups to write / drop), reply (the
--   caller's reply list), lock (the user's lock), upgrades (open upgrade sessions by expiry).
-- op also names: user, event_id, expect_state, expect_v (what the step read); set / del (hash
-- fields); cipher (hash fields holding ciphertext); seal (sealed key name -> ARGV position) and
-- wipe (sealed key name -> true); compact_entries / compact_value; channel (invalidation);
-- invalidation (the message); provider; moved, since, at, schedule, unschedule; upgrade_until
-- or upgrade_drop; hist, collapse, event_name, metric, hist_max,
-- stream_max; seen_after, seen_max, seen_ttl; sess_value, sess_ttl; reply, reply_ttl; drop_job
-- {id, job_key, queue}; jobs [{job_key, result_key, queue, payload, px, score, id}]; unlock;
-- counters [{key, field, amount}]. Absent means no.
-- Returns {'ok', new version}, {'duplicate', version} (the event applied before), or
-- {'conflict', version, state} (the record moved since the step read it); or TRYAGAIN on a
-- Redis Cluster node while the slot moves (below).

local op = cjson.decode(ARGV[1])
local function key(name) return KEYS[op.keys[name]] end
local rec = key('rec')

-- On a Redis Cluster node where the slot is moving, a key this step deletes and then writes or
-- reads again (the record compacted, a sealed key wiped) is out of its reach once deleted, and
-- the step would end halfway. A key of the slot that never exists, asked for with one that may:
-- the call fails on either node while the slot moves, and the step answers TRYAGAIN having
-- done nothing (the client sends it again), as Redis does for a command whose keys are split.
if type(redis.pcall('EXISTS', rec, rec .. ':never')) == 'table' then
  return redis.error_reply('TRYAGAIN the slot of the record is moving')
end
local sealed_keys = {'tokens', 'revoke'}

-- The key id of a ciphertext: v2 binary (byte 2, then 6 bytes of key id) or v1 text.
local function kid_of(v)
  if not v then return nil end
  if string.byte(v, 1) == 2 then
    if #v < 7 then return nil end
    return string.format('%02x%02x%02x%02x%02x%02x', string.byte(v, 2, 7))
  end
  return string.match(v, '^v1%.([^%.]+)%.')
end

-- Every ciphertext of the user, by name: the hash's cipher fields and the sealed keys.
local function ciphertexts()
  local out = {}
  local held = redis.call('HMGET', rec, unpack(op.cipher))
  for i, field in ipairs(op.cipher) do out[field] = held[i] or false end
  for _, name in ipairs(sealed_keys) do out[name] = redis.call('GET', key(name)) end
  return out
end

local function write_record(version)
  if #op.del > 0 then redis.call('HDEL', rec, unpack(op.del)) end
  local flat = {'v', tostring(version)}
  for field, value in pairs(op.set) do flat[#flat + 1] = field; flat[#flat + 1] = value end
  redis.call('HSET', rec, unpack(flat))
  for _, name in ipairs(sealed_keys) do
    if op.seal[name] then
      redis.call('SET', key(name), ARGV[op.seal[name]])
    elseif op.wipe[name] then
      redis.call('DEL', key(name))
    end
  end
  -- A hash that once held a long value (a sealed session, a long reason) keeps Redis's large
  -- encoding after the value is gone; written anew, it takes the compact one again if it fits.
  if redis.call('OBJECT', 'ENCODING', rec) == 'hashtable' then
    local all = redis.call('HGETALL', rec)
    local fits = #all <= 2 * op.compact_entries
    for i = 1, #all do
      if #all[i] > op.compact_value then fits = false; break end
    end
    if fits then
      redis.call('DEL', rec)
      redis.call('HSET', rec, unpack(all))
    end
  end
end

-- The start-up key check and rotation count ciphertexts per key id: keep the counts true.
local function recount_key_ids(before, after)
  for name, old in pairs(before) do
    local a, b = kid_of(old or nil), kid_of(after[name] or nil)
    if a ~= b then
      if a then redis.call('HINCRBY', key('kids'), a, -1) end
      if b then redis.call('HINCRBY', key('kids'), b, 1) end
    end
  end
end

local function update_indexes(before, after)
  if op.moved then
    redis.call('ZREM', key('idx_from'), op.user)
    redis.call('ZADD', key('idx_to'), op.since, op.user)
  end
  if op.schedule then
    redis.call('ZADD', key('sched'), op.schedule, op.user)
  elseif op.unschedule then
    redis.call('ZREM', key('sched'), op.user)
  end
  if op.sess_value then redis.call('SET', key('sess_set'), op.sess_value, 'EX', op.sess_ttl) end
  -- Upgrade sessions by expiry, for the cleanup job: a grant's index does not say which is open.
  if op.upgrade_until then
    redis.call('ZADD', key('upgrades'), op.upgrade_until, op.user)
  elseif op.upgrade_drop then
    redis.call('ZREM', key('upgrades'), op.user)
  end
  if op.keys.sess_drop then redis.call('DEL', key('sess_drop')) end
  if after.revoke and after.revoke ~= before.revoke then
    -- Tokens moved to the revocation outbox: the cleanup job retries what the provider missed.
    redis.call('ZADD', key('outbox'), op.at, op.user)
  end
  if before.tokens and before.tokens ~= after.tokens then
    -- The tokens a process may have cached are gone or replaced: tell every process now.
    redis.call('PUBLISH', op.channel, op.invalidation)
  end
end

local function record_history()
  local hist = key('hist')
  local appended = true
  if op.collapse then
    -- Refreshes in a row share one history entry that counts them: a grant refreshed hourly
    -- for a year keeps a short timeline. The stream still carries every one.
    local last = redis.call('LINDEX', hist, -1)
    if last then
      local prev = cjson.decode(last)
      if prev.event == op.event_name then
        local entry = cjson.decode(op.hist)
        entry.count = (prev.count or 1) + 1
        entry.first_at = prev.first_at or prev.at
        redis.call('LSET', hist, -1, cjson.encode(entry))
        appended = false
      end
    end
  end
  if appended then
    redis.call('RPUSH', hist, op.hist)
    redis.call('LTRIM', hist, -tonumber(op.hist_max), -1)
    redis.call('ZADD', key('histidx'), 'NX', op.at, op.user)
  end
  redis.call('XADD', key('stream'), 'MAXLEN', '~', op.stream_max, '*', 'entry', op.hist,
    'user', op.user, 'provider', op.provider)
  redis.call('HINCRBY', key('transitions'), op.metric, 1)
end

-- Event ids are kept for the queue's redelivery window, so a redelivery never applies twice.
local function remember_event()
  local seen = key('seen')
  redis.call('ZADD', seen, op.at, op.event_id)
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. op.seen_after)
  redis.call('ZREMRANGEBYRANK', seen, 0, -tonumber(op.seen_max) - 1)
  -- A user that goes quiet drops the whole set once its newest id is out of the window.
  redis.call('EXPIRE', seen, op.seen_ttl)
end

-- What rides along only when the step applies.
local function ride_along()
  if op.reply then
    redis.call('RPUSH', key('reply'), op.reply)
    redis.call('EXPIRE', key('reply'), op.reply_ttl)
  end
  if op.drop_job then
    -- The job of the schedule this step cancels or replaces: nothing stale stays queued.
    redis.call('DEL', KEYS[op.drop_job.job_key])
    redis.call('ZREM', KEYS[op.drop_job.queue], op.drop_job.id)
  end
  for _, job in ipairs(op.jobs or {}) do
    enqueue(KEYS[job.job_key], KEYS[job.result_key], KEYS[job.queue], ARGV[job.payload],
      job.px, job.score, job.id)
  end
  if op.unlock and redis.call('GET', key('lock')) == op.unlock then
    redis.call('DEL', key('lock'))
  end
  for _, c in ipairs(op.counters or {}) do
    if string.find(c.amount, '.', 1, true) then
      redis.call('HINCRBYFLOAT', KEYS[c.key], c.field, c.amount)
    else
      redis.call('HINCRBY', KEYS[c.key], c.field, c.amount)
    end
  end
end

local version = tonumber(redis.call('HGET', rec, 'v') or '0')
if redis.call('ZSCORE', key('seen'), op.event_id) then return {'duplicate', version} end
local state = redis.call('HGET', rec, 'state') or 'unprovisioned'
if state ~= op.expect_state or version ~= op.expect_v then
  return {'conflict', version, state}
end
local before = ciphertexts()
write_record(version + 1)
local after = ciphertexts()
recount_key_ids(before, after)
update_indexes(before, after)
if op.hist then record_history() end
remember_event()
ride_along()
return {'ok', version + 1}
