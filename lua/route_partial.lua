--[[
  Where a node's partial result goes, when its hub does not know the job's
  route (the node kept the job across a reconnection). Changes nothing.

  KEYS[1]  job hash            hub:v1:{c}:job:<job_id>
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  node id (bound to the connection, never taken from the frame)
  ARGV[3]  attempt number the node names
  Returns:
     {1, session_id, session_hub, ref}  the attempt is the job's current one;
             session_hub = the hub holding the session's socket now, else the
             hub the job came through
    -5  no such job (never existed, or its record expired)  (UNKNOWN_JOB)
    -6  the job was never dispatched to this node           (NODE_MISMATCH)
   -12  the node had the job once; another node has it now  (JOB_MOVED)
   -13  another attempt, or the job is no longer running    (STALE_PARTIAL)
]]
--- @include "includes/jobs"

local job_key = KEYS[1]
local prefix = ARGV[1]

local j = hmget(job_key, { 'status', 'node', 'attempt', 'hist', 'session', 'ref', 'shub' })
local refusal = attempt_refusal(j, ARGV[2], ARGV[3])
if refusal then return ({ unknown = -5, foreign = -6, moved = -12, stale = -13 })[refusal] end
local sid = j.session or ''
return { 1, sid, session_hub(prefix, sid, j.shub), j.ref or '' }
