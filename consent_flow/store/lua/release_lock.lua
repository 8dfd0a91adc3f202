-- Release the user's lock, only for its owner: a holder whose lock lapsed and was taken by
-- another never releases the other's.
-- KEYS: 1 the user's lock. ARGV: 1 the owner token.
-- Returns 1 when released, 0 when the lock was not the caller's (or not held).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
