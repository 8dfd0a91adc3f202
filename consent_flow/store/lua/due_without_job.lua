-- The due entries of the refresh schedule whose arq job is missing (lost between a commit and
-- its enqueue, or by a failover). Due entries whose job is still queued (a backlog) are stepped
-- over, page by page, so lost jobs behind a backlog are found too.
-- KEYS: 1 the schedule (zset: user by due time, ms).
-- ARGV: 1 now (ms; '' for Redis's time), 2 how many missing entries to return at most, 3 arq's
-- job key prefix with the refresh job id's head (everything before the user), 4 how many due
-- entries to look at at most.
-- Returns {entries looked at, {user, due, user, due, ...} of the missing, whether more are due
-- beyond those looked at (0/1), the now used (ms)}; none looked at while the slot moves.
local sched = KEYS[1]
local now, want, prefix, scan_max = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if now == '' then
  local t = redis.call('TIME')
  now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
-- While the schedule's slot moves between Redis Cluster nodes, a job key (built here, not in
-- KEYS) still on the other node reads as missing, and its job would be queued twice. A key of
-- the slot that never exists, asked for with the schedule, fails on either node meanwhile:
-- nothing is reported missing until the slot has moved.
if type(redis.pcall('EXISTS', sched, sched .. ':never')) == 'table' then
  return {0, {}, 0, now}
end
local missing, looked, offset, page = {}, 0, 0, 500
while #missing < 2 * want and offset < scan_max do
  local entries = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'WITHSCORES', 'LIMIT', offset,
    page)
  if #entries == 0 then break end
  for i = 1, #entries, 2 do
    local user, score = entries[i], entries[i + 1]
    looked = looked + 1
    -- The job id is the scheduler's: <head><user>:<due ms>.
    if redis.call('EXISTS', prefix .. user .. ':' .. score) == 0 then
      missing[#missing + 1] = user
      missing[#missing + 1] = score
      if #missing >= 2 * want then break end
    end
  end
  offset = offset + page
end
-- Is anything due beyond what was looked at? Only then is another batch worth it.
local more = #redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', looked, 1)
return {looked, missing, more, now}
