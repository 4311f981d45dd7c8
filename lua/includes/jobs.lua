--[[
  A job's life after dispatch_task: attempts starting on nodes, reports
  checked against the current attempt, and the ways a job ends (done,
  cancelled, timed out, its node lost).
]]
--- @include "includes/base"
--- @include "includes/sessions"
--- @include "includes/events"
--- @include "includes/pools"
--- @include "includes/queues"

-- Marks a job running on `nid` (whose slot the caller took) as a new attempt.
-- Returns the attempt number and the node's hub.
local function start_attempt(prefix, jid, nid, pool, now)
  local jkey = prefix .. 'job:' .. jid
  local attempt = rcall('HINCRBY', jkey, 'attempt', 1)
  local hist = rcall('HGET', jkey, 'hist') or ','
  rcall('HSET', jkey, 'status', 'running', 'node', nid, 'pool', pool, 'started', now,
    'hist', hist .. nid .. '@' .. attempt .. ',')
  rcall('HDEL', jkey, 'qpool')
  rcall('SADD', prefix .. 'node:' .. nid .. ':jobs', jid)
  local node_hub = rcall('HGET', prefix .. 'node:' .. nid, 'hub') or ''
  local j = rcall('HMGET', jkey, 'session', 'src', 'tgt')
  remember_node(prefix, j[1], pool, nid, j[2] .. ':' .. j[3])
  return attempt, node_hub
end

-- Whether node `nid` may report on attempt `attempt` (ARGV text) of the job
-- in `jkey`: nil when the job runs that attempt on that node, else why not:
-- 'unknown' (no such job), 'foreign' (never dispatched to the node), 'moved'
-- (the node had it once, another node has it now) or 'stale' (another
-- attempt, or the job is not running).
local function attempt_refusal(jkey, nid, attempt)
  local j = rcall('HMGET', jkey, 'status', 'node', 'attempt', 'hist')
  if not j[1] then return 'unknown' end
  if j[2] ~= nid then
    if j[4] and string.find(j[4], ',' .. nid .. '@', 1, true) then return 'moved' end
    return 'foreign'
  end
  if j[1] ~= 'running' or tostring(j[3]) ~= attempt then return 'stale' end
  return nil
end

-- Ends a job for good: keeps status and result for `ttl` ms, drops the
-- payload, files it under the session's ended jobs. Returns the result event.
local function end_job(prefix, jid, status, result, err, now, ttl)
  local jkey = prefix .. 'job:' .. jid
  local j = rcall('HMGET', jkey, 'session', 'ref', 'shub')
  rcall('HSET', jkey, 'status', status, 'result', result, 'error', err, 'ended', now)
  rcall('HDEL', jkey, 'payload', 'audio', 'qpool')
  rcall('PEXPIRE', jkey, ttl)
  rcall('ZREM', prefix .. 'deadlines', jid)
  rcall('ZREM', prefix .. 'queued', jid)
  local sid = j[1]
  rcall('SREM', prefix .. 'session:' .. sid .. ':jobs', jid)
  local dkey = prefix .. 'session:' .. sid .. ':done'
  rcall('ZADD', dkey, now, jid)
  rcall('ZREMRANGEBYSCORE', dkey, '-inf', now - ttl)
  rcall('ZREMRANGEBYRANK', dkey, 0, -1001)
  rcall('PEXPIRE', dkey, ttl)
  stat(prefix, status)
  if err ~= '' and status == 'failed' then stat(prefix, 'error:' .. err) end
  return result_event(session_hub(prefix, sid, j[3]), sid, jid, j[2] or '', status, result, err)
end

-- Hands queued jobs of the node's pools to its free slots, appending the
-- dispatch events. Bounded by the node's max_jobs.
local function fill_slots(prefix, nid, now, events)
  local nkey = prefix .. 'node:' .. nid
  local f = rcall('HMGET', nkey, 'running', 'max_jobs', 'state', 'pools')
  if f[3] ~= 'live' then return end
  local running, max_jobs = tonumber(f[1]) or 0, tonumber(f[2]) or 0
  local pools = split(f[4])
  local rounds = 0
  while running < max_jobs and rounds < max_jobs do
    rounds = rounds + 1
    local jid, pool = nil, nil
    for _, p in ipairs(pools) do
      if (tonumber(rcall('HGET', prefix .. 'qdepth', p)) or 0) > 0 then
        jid = pop_queue(prefix, p)
        if jid then pool = p; break end
      end
    end
    if not jid then break end
    running = running + 1
    rcall('HINCRBY', nkey, 'running', 1)
    local attempt, node_hub = start_attempt(prefix, jid, nid, pool, now)
    events[#events + 1] = dispatch_event(prefix, jid, nid, attempt, node_hub)
    stat(prefix, 'dispatched')
  end
  refresh_free(prefix, nid)
end

-- Takes an ended job off its node: the slot comes back and goes to the next
-- queued jobs of the node's pools (their dispatch events appended).
local function vacate(prefix, nid, jid, now, events)
  rcall('SREM', prefix .. 'node:' .. nid .. ':jobs', jid)
  release_slot(prefix, nid)
  fill_slots(prefix, nid, now, events)
end

-- A running job lost its node: a new attempt on another node while the
-- deadline and max_attempts allow, else failed with `reason`.
local function lose_job(prefix, jid, nid, node_hub, now, max_attempts, ttl, reason, events)
  local jkey = prefix .. 'job:' .. jid
  local j = rcall('HMGET', jkey, 'status', 'node', 'attempt', 'deadline', 'src', 'tgt', 'session')
  if j[1] ~= 'running' or j[2] ~= nid then return end
  local attempt = tonumber(j[3]) or 1
  events[#events + 1] = cancel_event(node_hub, nid, jid, attempt, reason)
  if attempt < max_attempts and now < (tonumber(j[4]) or 0) then
    local pools = rcall('SMEMBERS', prefix .. 'lang:' .. j[5] .. ':' .. j[6])
    table.sort(pools)
    local s = rcall('HMGET', prefix .. 'session:' .. j[7], 'pool')
    local target, pool = pick_node(prefix, pools, s[1] or nil, nil)
    if target then
      take_slot(prefix, target)
      local a, target_hub = start_attempt(prefix, jid, target, pool, now)
      events[#events + 1] = dispatch_event(prefix, jid, target, a, target_hub)
      stat(prefix, 'redispatched')
      return
    end
  end
  events[#events + 1] = end_job(prefix, jid, 'failed', 'null', reason, now, ttl)
end

-- Ends an unfinished job as failed with `reason` (cancelled, session gone,
-- timed out). A queued job leaves its queue; a running one gets a 'cancel'
-- for its node, appended to `events`. The 'result' goes to `ended` (which
-- may be `events`), then a running job's slot goes to the next queued jobs
-- ('dispatch' events). Returns false when the job had already ended.
local function cancel_job(prefix, jid, reason, now, ttl, events, ended)
  local j = rcall('HMGET', prefix .. 'job:' .. jid, 'status', 'node', 'attempt')
  if j[1] == 'queued' then
    unqueue(prefix, jid)
  elseif j[1] == 'running' then
    local node_hub = rcall('HGET', prefix .. 'node:' .. j[2], 'hub') or ''
    events[#events + 1] = cancel_event(node_hub, j[2], jid, tonumber(j[3]), reason)
  else
    return false
  end
  ended[#ended + 1] = end_job(prefix, jid, 'failed', 'null', reason, now, ttl)
  if j[1] == 'running' then vacate(prefix, j[2], jid, now, events) end
  return true
end
