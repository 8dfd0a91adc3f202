-- Drop history entries older than a cutoff, visiting only the users whose oldest entry is that
-- old. The visited users' history keys are built here, from what comes before and after the
-- user in them: they carry the index's shard tag, so they are in its slot.
-- KEYS: 1 the history index (zset: user by the time of their oldest entry).
-- ARGV: 1 what comes before the user in a history key, 2 the cutoff (seconds), 3 how many users
-- to visit at most, 4 what comes after the user.
-- Returns how many entries were dropped.
local histidx = KEYS[1]
local before, cutoff, limit, after = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local users = redis.call('ZRANGEBYSCORE', histidx, '-inf', '(' .. ARGV[2], 'LIMIT', 0, limit)
local dropped = 0
for _, user in ipairs(users) do
  local hist = before .. user .. after
  local oldest = nil
  while true do
    local head = redis.call('LINDEX', hist, 0)
    if not head then break end
    local at = tonumber(cjson.decode(head)['at'])
    if at >= cutoff then oldest = at; break end
    redis.call('LPOP', hist)
    dropped = dropped + 1
  end
  if oldest then
    redis.call('ZADD', histidx, string.format('%.3f', oldest), user)
  else
    redis.call('ZREM', histidx, user)
  end
end
return dropped
