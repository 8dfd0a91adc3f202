-- Pause a provider's calls fleet-wide until ARGV[1] (ms since the epoch, Redis's time), unless
-- a longer pause is already set. KEYS: the pause (string). Returns the pause's end.
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if wanted > current then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if wanted > now then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', math.ceil(wanted - now))
    return ARGV[1]
  end
end
return string.format('%d', current)
