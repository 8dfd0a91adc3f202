-- A job's end, as arq's finish_job and finish_failed_job write it: done (its result kept, its keys
-- and queue entry gone) or to run again (left queued, later by the retry's delay).
-- KEYS: 1 the in-progress key, 2 the job key, 3 the retry counter, 4 the result key, 5 the queue
-- (all in the job id's slot).
-- ARGV: 1 the job id, 2 '1' when the job is done, '0' when it runs again, 3 the serialized result
-- ('' for none kept), 4 the result's ttl (ms; '' to keep it forever), 5 how much later (ms) the
-- job runs again ('' for as it was queued), 6 how long (ms) the in-progress key stays ('' for
-- not at all: it is deleted).
if ARGV[6] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
if ARGV[2] == '1' then
  if ARGV[3] ~= '' then
    if ARGV[4] == '' then
      redis.call('SET', KEYS[4], ARGV[3])
    else
      redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
    end
  end
  redis.call('DEL', KEYS[3], KEYS[2])
  redis.call('ZREM', KEYS[5], ARGV[1])
elseif ARGV[5] ~= '' then
  redis.call('ZINCRBY', KEYS[5], ARGV[5], ARGV[1])
end
return 1
