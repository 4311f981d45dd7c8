--[[
  A node reports a job done: end the job, release the node's slot exactly
  once, and hand the slot the next queued job, if any.

  KEYS[1]  job hash            hub:v1:{c}:job:<job_id>
  KEYS[2]  node hash           hub:v1:{c}:node:<node_id>
  KEYS[3]  node's jobs set     hub:v1:{c}:node:<node_id>:jobs
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  job id
  ARGV[3]  node id (bound to the connection, never taken from the frame)
  ARGV[4]  attempt number the node was given
  ARGV[5]  status: finished | failed
  ARGV[6]  result, JSON text ('null' when none)
  ARGV[7]  error text ('' when none)
  ARGV[8]  now in ms (0 = Redis TIME)
  ARGV[9]  ended job record TTL in ms
  ARGV[10] '1' when the hub repeats a call whose reply it lost ('' else)
  ARGV[11] random seed
  Returns:
     {1, result_event, drained, {events}}  completed; slot released
             drained = 1 when the node is draining and now idle
             events = 'dispatch' for queued jobs handed to the freed slot,
             'result' (JOB_TIMEOUT) for queued jobs found past their deadline
             A repeat (ARGV[10]) of the call that ended the job gets its
             result event again, drained 0 and no events.
    -5  no such job (never existed, or its record expired)  (UNKNOWN_JOB)
    -6  the job was never dispatched to this node           (NODE_MISMATCH)
    -7  stale attempt, or the job already ended: nothing changed (STALE_ATTEMPT)
]]
--- @include "includes/jobs"

local job_key = KEYS[1]
local prefix = ARGV[1]
local jid = ARGV[2]
local nid = ARGV[3]
local now = now_ms(ARGV[8])
seed_random(ARGV[11])

local j = hmget(job_key, { 'status', 'node', 'attempt', 'hist', 'session', 'ref', 'shub' })
local refusal = attempt_refusal(j, nid, ARGV[4])
if refusal == 'stale' and ARGV[10] == '1' then
  local r = rcall('HMGET', job_key, 'result', 'error')
  if j.status == ARGV[5] and tostring(j.attempt) == ARGV[4] and r[1] == ARGV[6] and r[2] == ARGV[7] then
    return { 1, result_event(session_hub(prefix, j.session, j.shub), j.session, jid, j.ref or '',
      j.status, r[1], r[2]), 0, {} }
  end
end
if refusal then return ({ unknown = -5, foreign = -6, moved = -7, stale = -7 })[refusal] end

local result = end_job(prefix, jid, j, ARGV[5], ARGV[6], ARGV[7], now, tonumber(ARGV[9]))
local events = {}
local n = vacate(prefix, nid, jid, now, tonumber(ARGV[9]), events)
local drained = 0
if n.state == 'draining' and n.running == 0 then drained = 1 end
return { 1, result, drained, events }
