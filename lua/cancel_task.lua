--[[
  End a session's job before it finishes: the session cancelled it, or the
  session went away and did not come back within the resume window.

  KEYS[1]  job hash            hub:v1:{c}:job:<job_id>
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  job id
  ARGV[3]  session id (bound to the connection)
  ARGV[4]  reason code, e.g. CANCELLED
  ARGV[5]  now in ms (0 = Redis TIME)
  ARGV[6]  ended job record TTL in ms
  Returns:
     {1, result_event, {events}}  cancelled; a running job's slot is released
             events = 'cancel' for the node, 'dispatch' for queued jobs
             handed to the freed slot
    -5  no such job                                  (UNKNOWN_JOB)
   -10  the job belongs to another session           (SESSION_MISMATCH)
    -7  the job already ended: nothing changed       (STALE_ATTEMPT)
]]
--- @include "includes/core"

local job_key = KEYS[1]
local prefix = ARGV[1]
local jid = ARGV[2]
local reason = ARGV[4]
local now = now_ms(ARGV[5])

local j = rcall('HMGET', job_key, 'status', 'session', 'node', 'attempt')
if not j[1] then return -5 end
if j[2] ~= ARGV[3] then return -10 end
local events = {}
if j[1] == 'queued' then
  unqueue(prefix, jid)
elseif j[1] == 'running' then
  local node_hub = rcall('HGET', prefix .. 'node:' .. j[3], 'hub') or ''
  events[#events + 1] = { 'cancel', node_hub, j[3], jid, tonumber(j[4]), reason }
else
  return -7
end
local result = end_job(prefix, jid, 'failed', 'null', reason, now, tonumber(ARGV[6]))
if j[1] == 'running' then
  rcall('SREM', prefix .. 'node:' .. j[3] .. ':jobs', jid)
  release_slot(prefix, j[3])
  fill_slots(prefix, j[3], now, events)
end
return { 1, result, events }
