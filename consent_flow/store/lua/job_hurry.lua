-- Before an abort: a job queued for later is made due now, so a worker starts it and sees the
-- abort at once (what arq's Job.abort does with MULTI/EXEC).
-- KEYS: 1 the job's queue.
-- ARGV: 1 the job id.
-- Returns 1 when the job was moved forward.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
if tonumber(score) <= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then return 0 end
redis.call('ZADD', KEYS[1], 1, ARGV[1])
return 1
