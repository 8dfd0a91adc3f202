-- The jobs asked to abort (arq's abort set), forgetting requests older than arq keeps them.
-- KEYS: 1 arq's abort set (a key of its own: every queue's jobs are aborted through it).
-- ARGV: 1 how long (ms) a request to abort is kept.
-- Returns the ids of the jobs asked to abort.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - tonumber(ARGV[1])))
return redis.call('ZRANGE', KEYS[1], 0, -1)
