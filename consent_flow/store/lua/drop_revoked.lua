-- Forget tokens that the provider revoked (or that revoking was given up on), unless a later
-- revocation replaced them meanwhile (compare and delete); a still revoked record notes what
-- became of them, and the outcome is counted.
-- KEYS: 1 the record hash, 2 the sealed tokens to revoke, 3 the ciphertext count per key id,
-- 4 the revocation outbox, 5 the revocation counters.
-- ARGV: 1 the sealed tokens the caller revoked, 2 their key id, 3 the user, 4 the outcome.
-- Returns 1 when they were still there and are now gone, else 0 (nothing changed).
local rec, rvk, kids, outbox, counts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local sealed, kid, user, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', rvk) ~= sealed then return 0 end
redis.call('DEL', rvk)
redis.call('HDEL', rec, 'rvktries')
if redis.call('HGET', rec, 'state') == 'revoked' then
  redis.call('HSET', rec, 'provrev', outcome)
end
redis.call('HINCRBY', kids, kid, -1)
redis.call('ZREM', outbox, user)
redis.call('HINCRBY', counts, outcome, 1)
return 1
