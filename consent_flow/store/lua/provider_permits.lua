-- Permits for provider calls, fleet-wide: up to ARGV[1] calls may start now within the
-- provider's rate (a log of grants over a sliding window, so no window of that length ever
-- holds more than the rate allows, and an eighth of it at most in any tenth of it, so grants spread
-- over the window instead of arriving all at its start), its concurrency (leases
-- released when a call ends, expiring if their worker dies), and its pause (a 429 or
-- Retry-After anywhere slows everyone).
-- KEYS: the grant log (zset), the leases (zset), the pause (string: until, ms), all of one slot.
-- ARGV: how many wanted, grants per window ('' none), window (ms), leases at most ('' none),
-- lease time to live (ms), the grants' id stem.
-- Returns: how many granted (ids stem:1..n), and when none, ms to wait before asking again.
local log, leases, pause = KEYS[1], KEYS[2], KEYS[3]
local function granted(n, wait) return {n, wait} end
local want, cap, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local most, lease_ms, stem = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local paused = tonumber(redis.call('GET', pause) or '0')
if paused > now then return granted(0, string.format('%d', math.ceil(paused - now))) end

local n, wait = want, 0
if most then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', string.format('%.3f', now))
  local free = most - redis.call('ZCARD', leases)
  if free < n then n = free end
  if n <= 0 then wait = 5 end
end
if cap then
  redis.call('ZREMRANGEBYSCORE', log, '-inf', string.format('%.3f', now - window))
  local used = redis.call('ZCARD', log)
  if cap - used < n then n = cap - used end
  if n <= 0 then
    -- The grant whose ageing out frees the next permit.
    local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
    if oldest[2] then wait = math.max(wait, tonumber(oldest[2]) + window - now) end
  end
  local slice = window / 10
  local burst = math.max(1, math.ceil(cap / 8))
  local recent = redis.call('ZCOUNT', log, string.format('%.3f', now - slice), '+inf')
  if burst - recent < n then n = burst - recent end
  if n <= 0 and burst - recent <= 0 then
    local first = redis.call('ZRANGEBYSCORE', log, string.format('%.3f', now - slice), '+inf',
      'WITHSCORES', 'LIMIT', 0, 1)
    if first[2] then wait = math.max(wait, tonumber(first[2]) + slice - now) end
  end
end
if n <= 0 then return granted(0, string.format('%d', math.max(1, math.ceil(wait)))) end
local at = string.format('%.3f', now)
local until_at = string.format('%.3f', now + lease_ms)
for i = 1, n do
  local id = stem .. ':' .. i
  if cap then redis.call('ZADD', log, at, id) end
  if most then redis.call('ZADD', leases, until_at, id) end
end
if cap then redis.call('PEXPIRE', log, math.ceil(window) + 1000) end
if most then redis.call('PEXPIRE', leases, lease_ms + 1000) end
return granted(n, '0')
