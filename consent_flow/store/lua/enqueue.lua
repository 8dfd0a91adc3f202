-- Queue one arq job in one round trip (runs after enqueue_function.lua, which defines enqueue).
-- KEYS: 1 the job key, 2 the job's result key, 3 the queue.
-- ARGV: 1 the serialized job, 2 its expiry (ms), 3 when it is due (ms; '' for Redis's time
-- now), 4 the job id.
-- Returns 1 when queued, 0 when arq still holds a job of that id (that job stands).
return enqueue(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
