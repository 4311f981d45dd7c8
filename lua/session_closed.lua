--[[
  A session's socket closed and the resume window passed without it coming
  back: cancel its unfinished jobs (queued ones leave the queue, running ones
  are cancelled on their nodes and their slots released).

  KEYS[1]  session hash        hub:v1:{c}:session:<session_id>
  KEYS[2]  session's jobs set  hub:v1:{c}:session:<session_id>:jobs
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  session id
  ARGV[3]  hub id that held the session's socket
  ARGV[4]  reason code, e.g. CANCELLED
  ARGV[5]  now in ms (0 = Redis TIME)
  ARGV[6]  ended job record TTL in ms
  ARGV[7]  most jobs to cancel in this call
  ARGV[8]  random seed
  Returns:
     {1, {events}}  cancelled; 'result' per job (nobody to send it to, but a
                    later resume finds it), 'cancel' per running job,
                    'dispatch' for queued jobs handed to freed slots
     {0, {}}        the session resumed on another hub meanwhile: nothing done
]]
--- @include "includes/jobs"

local session_key = KEYS[1]
local session_jobs_key = KEYS[2]
local prefix = ARGV[1]
local now = now_ms(ARGV[5])
local ttl = tonumber(ARGV[6])
seed_random(ARGV[8])

local holder = rcall('HGET', session_key, 'hub')
if holder and holder ~= ARGV[3] then return { 0, {} } end
local events = {}
local jobs = rcall('SRANDMEMBER', session_jobs_key, tonumber(ARGV[7]))
table.sort(jobs)
for _, jid in ipairs(jobs) do
  -- Each job's result after the dispatch events for the slot it freed.
  local ended = {}
  if cancel_job(prefix, jid, ARGV[4], now, ttl, events, ended) then
    events[#events + 1] = ended[1]
  else
    rcall('SREM', session_jobs_key, jid)
  end
end
return { 1, events }
