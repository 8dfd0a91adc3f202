-- An event's outcome for the caller waiting on it, kept a while for duplicates of the event.
-- One script rather than MULTI/EXEC so that it runs on a Redis Cluster too (one key, one slot).
-- KEYS: 1 the caller's reply list. ARGV: 1 the outcome, 2 how long the list lives (s).
-- Returns the list's length.
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return n
