-- A record in one round trip: the hash and the sealed keys, from one moment.
-- KEYS: the record hash, the sealed tokens, the sealed tokens still to revoke.
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
