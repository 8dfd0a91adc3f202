-- Queue the refresh jobs a sweep found missing: each job only if its key is not there yet.
-- KEYS: 1 the queue.
-- ARGV: 1 the jobs' expiry (ms), then four per job: its job key, the serialized job, its queue
-- score (ms), its id.
-- Returns how many were queued; none while the queue's slot moves between Redis Cluster nodes,
-- where a job key still on the other node would be written again on this one (a probe as in
-- due_without_job.lua).
local queue = KEYS[1]
if type(redis.pcall('EXISTS', queue, queue .. ':never')) == 'table' then
  return 0
end
local queued = 0
for i = 2, #ARGV, 4 do
  local key, payload, score, id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('SET', key, payload, 'PX', ARGV[1], 'NX') then
    redis.call('ZADD', queue, score, id)
    queued = queued + 1
  end
end
return queued
