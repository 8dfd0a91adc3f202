-- A worker's poll: claim the jobs that are due by Redis's clock and that no worker runs yet.
-- The in-progress keys are built here, like arq's own: a job id starts with its queue's shard
-- tag, so they are in the queue's slot.
-- KEYS: 1 the queue.
-- ARGV: 1 arq's in-progress key prefix, 2 the in-progress keys' ttl (ms), 3 how many jobs to
-- claim at most, 4 how many due entries to look at at most.
-- Returns {job id, score, ...} of the jobs this worker now owns, oldest first; none while the
-- queue's slot moves between Redis Cluster nodes (below).
local queue, prefix, ttl = KEYS[1], ARGV[1], ARGV[2]

-- While the slot moves, the queue may have reached the new node before a running job's
-- in-progress key (built here, not in KEYS): there that key reads as missing and the job would
-- be claimed twice. A key of the slot that never exists, asked for with the queue: the call
-- fails on either node while the slot moves, and this poll claims nothing on this queue.
if type(redis.pcall('EXISTS', queue, queue .. ':never')) == 'table' then
  return {}
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local want, look = tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, look)
local claimed = {}
for i = 1, #due, 2 do
  local key = prefix .. due[i]
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, '1', 'PX', ttl)
    claimed[#claimed + 1] = due[i]
    claimed[#claimed + 1] = due[i + 1]
    if #claimed >= 2 * want then break end
  end
end
return claimed
