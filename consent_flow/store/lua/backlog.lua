-- The due backlog as operators see it: how many wait, since when the oldest is due, and how
-- many of their grants lapse before their turn at a given drain rate (taken soonest-lapsing
-- first, as batches take them), over the first ARGV[3] of them at most.
-- KEYS: the schedule (zset, by due ms), the ready set (zset, by lapse ms), its due times (zset).
-- ARGV: the drain rate (per second), the record key's prefix and suffix around the user, how
-- many to look at at most, then the record's lapse fields (refresh token, access token).
-- Returns: due (ready + due in the schedule), the oldest due time (ms, or false), lapsing, and
-- how many were looked at.
local sched, ready, ready_due = KEYS[1], KEYS[2], KEYS[3]
local rate, head, tail, most = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_text = string.format('%d', now)

local due = redis.call('ZCARD', ready) + redis.call('ZCOUNT', sched, '-inf', now_text)
local oldest = false
for _, key in ipairs({sched, ready_due}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) <= now and (not oldest or tonumber(first[2]) < oldest) then
    oldest = tonumber(first[2])
  end
end

local lapses = {}
local rows = redis.call('ZRANGE', ready, 0, most - 1, 'WITHSCORES')
for i = 2, #rows, 2 do lapses[#lapses + 1] = tonumber(rows[i]) end
if #lapses < most then
  rows = redis.call('ZRANGEBYSCORE', sched, '-inf', now_text, 'WITHSCORES', 'LIMIT', 0,
    most - #lapses)
  for i = 1, #rows, 2 do
    local at = redis.call('HMGET', head .. rows[i] .. tail, ARGV[5], ARGV[6])
    local first = (at[1] and at[1] ~= '') and at[1] or at[2]
    lapses[#lapses + 1] = (first and first ~= '') and tonumber(first) * 1000 or tonumber(rows[i + 1])
  end
end
table.sort(lapses)
local lapsing = 0
for i, lapse in ipairs(lapses) do
  if rate <= 0 or lapse < now + (i - 1) * 1000 / rate then lapsing = lapsing + 1 end
end
return {due, oldest and string.format('%d', oldest) or false, lapsing, #lapses}
