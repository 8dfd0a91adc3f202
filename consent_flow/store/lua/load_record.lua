-- A record in one round trip: the hash and the sealed keys, from one moment.
-- KEYS: 1 the record hash, 2 the sealed tokens, 3 the sealed tokens still to revoke.
-- ARGV: none. Returns {the record (HGETALL), the tokens, the tokens to revoke}.
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
