-- Claim a pending authorization session for one callback: single use, checked against the
-- record, and its sealed code left for the worker that applies the event.
-- KEYS: 1 the record hash, 2 the inbox key of the callback's event.
-- ARGV: 1 the session id the callback names, 2 the callback's event id, 3 the sealed code (''
-- for none), 4 the inbox's ttl (seconds).
-- Returns 'ok', or why not: 'not_pending', 'unknown_session', 'already_used', 'expired'.
local rec, inbox = KEYS[1], KEYS[2]
-- A session is open while pending, or beside a grant (an upgrade) while provisioned.
local state = redis.call('HGET', rec, 'state')
if state ~= 'pending' and state ~= 'provisioned' then return 'not_pending' end
if redis.call('HGET', rec, 'sid') ~= ARGV[1] then return 'unknown_session' end
if redis.call('HGET', rec, 'claimed') then return 'already_used' end
-- Session expiry is Redis's time, whoever wrote it and whichever clock this process keeps.
local t = redis.call('TIME')
local sexp = tonumber(redis.call('HGET', rec, 'sexp') or '0')
if sexp <= tonumber(t[1]) + tonumber(t[2]) / 1000000 then return 'expired' end
redis.call('HSET', rec, 'claimed', ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', inbox, ARGV[3], 'EX', ARGV[4]) end
return 'ok'
