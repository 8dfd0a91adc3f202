-- Take the user's lock when it is free, and read the record (hash and sealed keys) in the same
-- round trip.
-- KEYS: 1 the user's lock, 2 the record hash, 3 the sealed tokens, 4 the sealed tokens to
-- revoke.
-- ARGV: 1 the owner token to set, 2 the lock's ttl (ms).
-- Returns {1 if the lock was taken else 0, the record (HGETALL), the tokens, the tokens to
-- revoke}.
local got = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
return {got and 1 or 0, redis.call('HGETALL', KEYS[2]), redis.call('GET', KEYS[3]),
  redis.call('GET', KEYS[4])}
