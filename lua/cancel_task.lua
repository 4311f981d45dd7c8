--[[
  End a session's job before it finishes, at the session's request.

  KEYS[1]  job hash            hub:v1:{c}:job:<job_id>
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  job id
  ARGV[3]  session id (bound to the connection)
  ARGV[4]  reason code, e.g. CANCELLED
  ARGV[5]  now in ms (0 = Redis TIME)
  ARGV[6]  ended job record TTL in ms
  ARGV[7]  random seed
  Returns:
     {1, result_event, {events}}  cancelled; a running job's slot is released
             events = 'cancel' for the node, 'dispatch' for queued jobs
             handed to the freed slot
    -5  no such job                                  (UNKNOWN_JOB)
   -10  the job belongs to another session           (SESSION_MISMATCH)
    -7  the job already ended: nothing changed       (STALE_ATTEMPT)
]]
--- @include "includes/jobs"

local job_key = KEYS[1]
local prefix = ARGV[1]
local jid = ARGV[2]
local now = now_ms(ARGV[5])
seed_random(ARGV[7])

local j = hmget(job_key, ATTEMPT_FIELDS)
if not j.session then return -5 end
if j.session ~= ARGV[3] then return -10 end
local events, ended = {}, {}
if not cancel_job(prefix, jid, ARGV[4], now, tonumber(ARGV[6]), events, ended, j) then return -7 end
return { 1, ended[1], events }
