--[[
  A session connects: record which hub holds its socket. When it reconnects
  (to this hub or another) within the resume window, also return what it
  missed.

  KEYS[1]  session hash        hub:v1:{c}:session:<session_id>
  KEYS[2]  session's jobs set  hub:v1:{c}:session:<session_id>:jobs
  KEYS[3]  ended jobs zset     hub:v1:{c}:session:<session_id>:done
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  session id (proved by the resume token)
  ARGV[3]  hub id now holding the session's socket
  ARGV[4]  session record TTL in ms
  ARGV[5]  most ended jobs to return
  Returns:
     {1, {{job_id, ref, status}, ...}, {result_event, ...}}
            unfinished jobs (status queued | running), then the ended jobs
            whose results the session has not acknowledged, oldest first
     {0, {}, {}}  nothing known of the session (expired): a fresh start
]]
--- @include "includes/events"

local session_key = KEYS[1]
local session_jobs_key = KEYS[2]
local done_key = KEYS[3]
local prefix = ARGV[1]
local sid = ARGV[2]

local known = rcall('EXISTS', session_key, session_jobs_key, done_key)
rcall('HSET', session_key, 'hub', ARGV[3], 'seen', 1)
rcall('PEXPIRE', session_key, tonumber(ARGV[4]))
if known == 0 then return { 0, {}, {} } end

local open = {}
for _, jid in ipairs(rcall('SMEMBERS', session_jobs_key)) do
  local j = rcall('HMGET', prefix .. 'job:' .. jid, 'status', 'ref')
  if j[1] == 'queued' or j[1] == 'running' then
    open[#open + 1] = { jid, j[2] or '', j[1] }
  end
end
local ended, dropped = {}, false
for _, jid in ipairs(rcall('ZRANGE', done_key, 0, tonumber(ARGV[5]) - 1)) do
  local j = rcall('HMGET', prefix .. 'job:' .. jid, 'status', 'ref', 'result', 'error')
  if j[1] == 'finished' or j[1] == 'failed' then
    ended[#ended + 1] = result_event(ARGV[3], sid, jid, j[2] or '', j[1], j[3] or 'null', j[4] or '')
  else
    rcall('ZREM', done_key, jid)
    dropped = true
  end
end
-- Emptied: the next end gives the ended jobs zset a TTL again (as ack_results).
if dropped and #ended == 0 and rcall('EXISTS', done_key) == 0 then
  rcall('HDEL', session_key, 'done_renew')
end
return { 1, open, ended }
