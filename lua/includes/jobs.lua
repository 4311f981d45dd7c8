--[[
  A job's life after dispatch_task: attempts starting on nodes, reports
  checked against the current attempt, and the ways a job ends (done,
  cancelled, timed out, its node lost).

  Each job and node hash is read once per step: the helpers take what the
  caller read (a job's fields as a table, a node as read_node returns it).
]]
--- @include "includes/base"
--- @include "includes/sessions"
--- @include "includes/events"
--- @include "includes/pools"
--- @include "includes/queues"

-- Marks job `jid` (its ATTEMPT_FIELDS in `j`) running on node `n`, whose
-- slot the caller took, as a new attempt. Returns its dispatch event.
local function start_attempt(prefix, jid, j, n, pool, now)
  local jkey = prefix .. 'job:' .. jid
  local attempt = (tonumber(j.attempt) or 0) + 1
  rcall('HSET', jkey, 'status', 'running', 'node', n.id, 'attempt', attempt,
    'hist', (j.hist or ',') .. n.id .. '@' .. attempt .. ',')
  rcall('SADD', n.key .. ':jobs', jid)
  local shub_now = remember_node(prefix, j.session, pool, n.id, j.src .. ':' .. j.tgt, j.shub)
  return dispatch_event(jid, j, n.id, attempt, n.hub, shub_now)
end

-- Whether node `nid` may report on attempt `attempt` (ARGV text) of a job
-- whose status, node, attempt and hist are `j`: nil when the job runs that
-- attempt on that node, else why not: 'unknown' (no such job), 'foreign'
-- (never dispatched to the node), 'moved' (the node had it once, another
-- node has it now) or 'stale' (another attempt, or the job is not running).
local function attempt_refusal(j, nid, attempt)
  if not j.status then return 'unknown' end
  if j.node ~= nid then
    if j.hist and string.find(j.hist, ',' .. nid .. '@', 1, true) then return 'moved' end
    return 'foreign'
  end
  if j.status ~= 'running' or tostring(j.attempt) ~= attempt then return 'stale' end
  return nil
end

-- Ends job `jid` for good (`j`: its session, ref and shub): keeps status and
-- result for `ttl` ms, drops the payload, files it under the session's ended
-- jobs (the newest 1000). Returns the result event. The caller took the job
-- out of its queue or off its node.
--
-- The ended jobs zset lives at least `ttl` after each end, so each result
-- can be resumed while its record lives: its TTL is set to 2 * ttl once the
-- session hash's 'done_renew' time has passed, which then moves to now + ttl.
-- Scripts that may empty the zset (Redis deletes an empty one) drop
-- 'done_renew', so the zset the next end creates gets its TTL.
local function end_job(prefix, jid, j, status, result, err, now, ttl)
  local jkey = prefix .. 'job:' .. jid
  rcall('HSET', jkey, 'status', status, 'result', result, 'error', err)
  rcall('HDEL', jkey, 'payload', 'audio')
  rcall('PEXPIRE', jkey, ttl)
  rcall('ZREM', prefix .. 'deadlines', jid)
  local sid = j.session
  local skey = prefix .. 'session:' .. sid
  rcall('SREM', skey .. ':jobs', jid)
  local dkey = skey .. ':done'
  rcall('ZADD', dkey, now, jid)
  rcall('ZREMRANGEBYRANK', dkey, 0, -1001)
  local s = rcall('HMGET', skey, 'hub', 'done_renew')
  if now >= (tonumber(s[2]) or 0) then
    rcall('PEXPIRE', dkey, 2 * ttl)
    -- Only into a live hash: recreating an expired one would leave it without a TTL.
    if s[1] then rcall('HSET', skey, 'done_renew', now + ttl) end
  end
  return result_event(s[1] or j.shub or '', sid, jid, j.ref or '', status, result, err)
end

-- Most queued jobs past their deadline that one fill_slots call ends; the
-- sweep ends the others.
local MAX_EXPIRED_PER_FILL = 32

-- Hands node `n`'s free slots the jobs queued for its language pairs, from
-- whichever pool's nodes were busy when they came: each slot takes, of the
-- heads of its pairs' queues, the one whose queue wait ends first (within a
-- pair, sessions take turns). A job past its deadline never starts: it ends
-- JOB_TIMEOUT and the slot goes to the next. Appends the 'dispatch' and
-- 'result' events, then updates the node's free entries. Bounded: one
-- ZMSCORE over the node's pairs, at most max_jobs starts and
-- MAX_EXPIRED_PER_FILL ends.
local function fill_slots(prefix, n, now, ttl, events)
  if n.state == 'live' and n.running < n.max_jobs and #n.pairs > 0 then
    local heads = rcall('ZMSCORE', prefix .. 'qheads', unpack(n.pairs))
    local expired = 0
    for _ = 1, n.max_jobs + MAX_EXPIRED_PER_FILL do
      local best, best_at = nil, nil
      for i = 1, #n.pairs do
        local at = tonumber(heads[i])
        if at and (not best_at or at < best_at) then best, best_at = i, at end
      end
      if not best then break end
      local jid, j
      jid, j, heads[best] = pop_queue(prefix, n.pairs[best])
      if jid then
        if now >= (tonumber(j.deadline) or 0) then
          events[#events + 1] = end_job(prefix, jid, j, 'failed', 'null', 'JOB_TIMEOUT', now, ttl)
          expired = expired + 1
          if expired >= MAX_EXPIRED_PER_FILL then break end
        else
          n.running = rcall('HINCRBY', n.key, 'running', 1)
          events[#events + 1] = start_attempt(prefix, jid, j, n, n.pools[1], now)
          if n.running >= n.max_jobs then break end
        end
      end
    end
  end
  set_free(prefix, n)
end

-- Takes an ended job off node `nid`: the slot comes back and goes to the
-- next queued jobs of the node's pairs (their events appended). `n` is the
-- node when the caller read it already. Returns the node.
local function vacate(prefix, nid, jid, now, ttl, events, n)
  n = n or read_node(prefix, nid)
  rcall('SREM', n.key .. ':jobs', jid)
  if release_slot(n) then fill_slots(prefix, n, now, ttl, events) end
  return n
end

-- A running job lost its node: a new attempt on another node while the
-- deadline and max_attempts allow, else failed with `reason`.
local function lose_job(prefix, jid, nid, node_hub, now, max_attempts, ttl, reason, events)
  local j = hmget(prefix .. 'job:' .. jid, ATTEMPT_FIELDS)
  if j.status ~= 'running' or j.node ~= nid then return end
  local attempt = tonumber(j.attempt) or 1
  events[#events + 1] = cancel_event(node_hub, nid, jid, attempt, reason)
  if attempt < max_attempts and now < (tonumber(j.deadline) or 0) then
    local pools = rcall('SMEMBERS', prefix .. 'lang:' .. j.src .. ':' .. j.tgt)
    table.sort(pools)
    local pref_pool = rcall('HGET', prefix .. 'session:' .. j.session, 'pool')
    local target, pool = pick_node(prefix, pools, pref_pool or nil, nil)
    if target then
      local n = read_node(prefix, target)
      take_slot(prefix, n)
      events[#events + 1] = start_attempt(prefix, jid, j, n, pool, now)
      return
    end
  end
  events[#events + 1] = end_job(prefix, jid, j, 'failed', 'null', reason, now, ttl)
end

-- Ends an unfinished job as failed with `reason` (cancelled, session gone,
-- timed out). A queued job leaves its queue; a running one gets a 'cancel'
-- for its node, appended to `events`. The 'result' goes to `ended` (which
-- may be `events`), then a running job's slot goes to the next queued jobs
-- (their events appended to `events`). `j` is the job's ATTEMPT_FIELDS when
-- the caller read them already. Returns false when the job had already ended.
local function cancel_job(prefix, jid, reason, now, ttl, events, ended, j)
  j = j or hmget(prefix .. 'job:' .. jid, ATTEMPT_FIELDS)
  local n = nil
  if j.status == 'queued' then
    unqueue(prefix, jid, j.src .. ':' .. j.tgt, j.session)
  elseif j.status == 'running' then
    n = read_node(prefix, j.node)
    events[#events + 1] = cancel_event(n.hub, j.node, jid, tonumber(j.attempt), reason)
  else
    return false
  end
  ended[#ended + 1] = end_job(prefix, jid, j, 'failed', 'null', reason, now, ttl)
  if n then vacate(prefix, j.node, jid, now, ttl, events, n) end
  return true
end
