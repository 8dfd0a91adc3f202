-- enqueue(): write one arq job as arq's own enqueue_job would, unless arq still holds its id.
-- Not a script of its own: the store puts this function in front of the scripts that queue jobs
-- (enqueue.lua, commit.lua), since one EVAL cannot call a function defined by another.
-- job_key, result_key, queue: arq's keys for the job. payload: the serialized job. px: its
-- expiry (ms). score: when it is due (ms), or '' for Redis's time now. id: the job id.
-- Returns 1 when written, 0 when arq still holds a job (queued, running, or with a result).
local function enqueue(job_key, result_key, queue, payload, px, score, id)
  if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
  if score == '' then
    local t = redis.call('TIME')
    score = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  end
  redis.call('SET', job_key, payload, 'PX', px)
  redis.call('ZADD', queue, score, id)
  return 1
end
