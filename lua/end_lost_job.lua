--[[
  End a job that Redis no longer knows: it came back from a restart without
  its last writes (protocol.md §8), and a session or a node still holds it.

  KEYS[1]  job hash            hub:v1:{c}:job:<job_id>
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  job id
  ARGV[3]  session id (the session that holds the job)
  ARGV[4]  the job's ref
  ARGV[5]  hub holding the session's socket, if the session hash has none
  ARGV[6]  now in ms (0 = Redis TIME)
  ARGV[7]  ended job record TTL in ms
  Returns:
    {1, result_event}  recorded as failed with JOB_LOST, filed under the
                       session's ended jobs (for its resume)
    0                  Redis knows the job: nothing changed
]]
--- @include "includes/jobs"

local job_key = KEYS[1]
local prefix = ARGV[1]
local jid = ARGV[2]
local now = now_ms(ARGV[6])

if rcall('EXISTS', job_key) == 1 then return 0 end
local j = { session = ARGV[3], ref = ARGV[4], shub = ARGV[5] }
rcall('HSET', job_key, 'session', j.session, 'ref', j.ref, 'shub', j.shub)
return { 1, end_job(prefix, jid, j, 'failed', 'null', 'JOB_LOST', now, tonumber(ARGV[7])) }
