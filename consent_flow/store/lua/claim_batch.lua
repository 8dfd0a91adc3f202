-- A batch of due scheduled refreshes for one worker: the due part of the schedule moves into the
-- ready set (scored by when the grant lapses: its refresh token, else its access token), then
-- the soonest-lapsing are taken, each under its own single-flight lock, and read.
--
-- A taken member stays in the schedule as a lease (due again after ARGV[4] ms): its refresh's
-- commit replaces that with the next due time, so a worker that dies mid-batch loses nothing.
-- A member whose lock is held elsewhere goes back to the schedule (NX: the holder's own commit
-- may have rescheduled it already); one rescheduled by a commit meanwhile is no longer due.
--
-- KEYS: the schedule (zset), the ready set (zset), the ready set's due times (zset: how long
-- the backlog has waited), all of one shard.
-- ARGV: how many to take, how many due entries to move into the ready set at most, the lock's
-- time to live (ms), the lease (ms), the lock owner token's stem, then the affixes of the
-- per-user keys (record, sealed tokens, tokens to revoke, lock: prefix and suffix of each),
-- then the record's field names (refresh token lapse, access token lapse, state, in-flight
-- mark) and the provisioned state's value.
-- Returns: Redis's time (ms), and per member taken {user, lock token or
-- false, then (when locked) the record's fields, sealed tokens, sealed tokens to revoke}.
-- On a Redis Cluster node where the shard's slot is moving, it answers TRYAGAIN having done
-- nothing, as Redis does for a command whose keys are split: the client sends it again.
local sched, ready, ready_due = KEYS[1], KEYS[2], KEYS[3]

-- While the slot moves, the per-user keys this script builds (not in KEYS) may be on the other
-- node, and the first call on one would end the script halfway, with members already out of
-- the schedule. A key of the slot that never exists, asked for with one that may: the call
-- fails on either node while the slot moves, and succeeds once it has settled.
if type(redis.pcall('EXISTS', sched, sched .. ':never')) == 'table' then
  return redis.error_reply('TRYAGAIN the slot of the schedule is moving')
end
local want, promote = tonumber(ARGV[1]), tonumber(ARGV[2])
local lock_px, lease_ms, stem = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local function key(n, user) return ARGV[4 + 2 * n] .. user .. ARGV[5 + 2 * n] end
local f_rexp, f_exp, f_state, f_inflight, provisioned = ARGV[14], ARGV[15], ARGV[16], ARGV[17],
  ARGV[18]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_text = string.format('%d', now)
local lease_text = string.format('%d', now + lease_ms)

local due = redis.call('ZRANGEBYSCORE', sched, '-inf', now_text, 'WITHSCORES', 'LIMIT', 0, promote)
for i = 1, #due, 2 do
  local user, score = due[i], due[i + 1]
  local lapse = score
  local at = redis.call('HMGET', key(1, user), f_rexp, f_exp)
  local first = (at[1] and at[1] ~= '') and at[1] or at[2]
  if first and first ~= '' then lapse = string.format('%d', math.floor(tonumber(first) * 1000)) end
  redis.call('ZADD', ready, lapse, user)
  redis.call('ZADD', ready_due, 'NX', score, user)
  redis.call('ZREM', sched, user)
end

local taken = {}
local popped = want > 0 and redis.call('ZPOPMIN', ready, want) or {}
for i = 1, #popped, 2 do
  local user = popped[i]
  redis.call('ZREM', ready_due, user)
  local score = redis.call('ZSCORE', sched, user)
  if not score or tonumber(score) <= now then
    local token = stem .. ':' .. ((i + 1) / 2)
    if redis.call('SET', key(4, user), token, 'PX', lock_px, 'NX') then
      redis.call('ZADD', sched, lease_text, user)
      local rec = key(1, user)
      local fields = redis.call('HGETALL', rec)
      if redis.call('HGET', rec, f_state) == provisioned then
        -- Marked before the call: a worker that dies with the request in flight leaves it.
        redis.call('HSET', rec, f_inflight, string.format('%.3f', now / 1000))
      end
      taken[#taken + 1] = {user, token, fields, redis.call('GET', key(2, user)),
        redis.call('GET', key(3, user))}
    else
      redis.call('ZADD', sched, 'NX', lease_text, user)
      taken[#taken + 1] = {user, false}
    end
  end
end
return {now_text, taken}
