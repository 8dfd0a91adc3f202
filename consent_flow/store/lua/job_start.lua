-- A job's start, as arq's run_job opens it (its one MULTI/EXEC): read the job and count the try.
-- KEYS: 1 the job key, 2 the job's retry counter (both in the job id's slot).
-- ARGV: 1 the retry counter's ttl (s).
-- Returns {the serialized job, or nil when it expired; this try's number}.
local job = redis.call('GET', KEYS[1])
local try = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {job, try}
