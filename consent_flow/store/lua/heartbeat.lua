-- A worker's heartbeat, timed by Redis's clock: it is live, and its own clock is this far off.
-- KEYS: the workers (zset by last beat), their clock offsets (hash).
-- ARGV: worker id, its clock's offset from Redis's time (seconds), seconds after which a silent
-- worker is forgotten. Returns Redis's time of the beat (seconds, as text).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local at = string.format('%.6f', now)
redis.call('ZADD', KEYS[1], at, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - tonumber(ARGV[3])),
  'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return at
