--[[
  Helpers shared by the scheduling scripts (inlined by the loader in
  hub/scheduler.py wherever a script says  --- @include "includes/core").

  Every key is built from `prefix` (ARGV[1] of each script), which carries the
  cell's hash tag, so keys derived here live in the same cluster slot as the
  script's KEYS.

  Events returned to the hubs (arrays of strings and integers):
    {'dispatch', node_hub, node_id, job_id, attempt, session_id, src, tgt,
     deadline_ms, payload, audio, session_hub, ref}
    {'result', session_hub, session_id, job_id, ref, status, result, error}
    {'cancel', node_hub, node_id, job_id, attempt, reason}
    {'replaced', old_hub, node_id, old_epoch}
    {'lost', node_hub, node_id, epoch}
]]
local rcall = redis.call

local seed = 1
local function seed_random(value)
  seed = (tonumber(value) or 1) % 2147483647
  if seed < 1 then seed = 1 end
end

-- Park-Miller generator: randomness comes in through ARGV so runs are repeatable.
local function random_unit()
  seed = (seed * 16807) % 2147483647
  return seed / 2147483647
end

-- One clock for every hub: the caller's value when given (tests), else Redis TIME.
local function now_ms(value)
  local t = tonumber(value)
  if t and t > 0 then return t end
  local tm = rcall('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end

local function split(text)
  local out = {}
  if not text or text == '' then return out end
  for item in string.gmatch(text, '[^,]+') do out[#out + 1] = item end
  return out
end

local function stat(prefix, field, n)
  rcall('HINCRBY', prefix .. 'stats', field, n or 1)
end

-- A node is in the free zset of each of its pools exactly when it is live and
-- has a free slot; its score is its load, running / max_jobs.
local function refresh_free(prefix, nid)
  local f = rcall('HMGET', prefix .. 'node:' .. nid, 'running', 'max_jobs', 'state', 'pools')
  local running, max_jobs = tonumber(f[1]) or 0, tonumber(f[2]) or 0
  local free = f[3] == 'live' and running < max_jobs
  for _, pool in ipairs(split(f[4])) do
    if free then
      rcall('ZADD', prefix .. 'free:' .. pool, running / max_jobs, nid)
    else
      rcall('ZREM', prefix .. 'free:' .. pool, nid)
    end
  end
end

-- Least-loaded node of one pool, ties broken at random: O(log N).
-- `first` is the pool's ZRANGE 0 0 WITHSCORES when the caller read it already.
local function pick_in_pool(prefix, pool, first)
  local fkey = prefix .. 'free:' .. pool
  first = first or rcall('ZRANGE', fkey, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  local ties = rcall('ZCOUNT', fkey, first[2], first[2])
  if ties <= 1 then return first[1] end
  local i = math.floor(random_unit() * ties)
  if i >= ties then i = ties - 1 end
  if i == 0 then return first[1] end
  return rcall('ZRANGE', fkey, i, i)[1]
end

-- Choose a node for a language pair served by `pools` (sorted list of pool ids).
-- The session's previous node first (warm context), then its preferred pool,
-- then the pool whose least-loaded node is least loaded. Returns node, pool.
local function pick_node(prefix, pools, pref_pool, pref_node)
  if pref_pool then
    local serves = false
    for _, p in ipairs(pools) do if p == pref_pool then serves = true end end
    if serves then
      if pref_node and rcall('ZSCORE', prefix .. 'free:' .. pref_pool, pref_node) then
        return pref_node, pref_pool
      end
      local nid = pick_in_pool(prefix, pref_pool)
      if nid then return nid, pref_pool end
    end
  end
  if #pools == 1 then
    local nid = pick_in_pool(prefix, pools[1])
    if nid then return nid, pools[1] end
    return nil
  end
  local best_score, best, firsts = nil, {}, {}
  for _, p in ipairs(pools) do
    local first = rcall('ZRANGE', prefix .. 'free:' .. p, 0, 0, 'WITHSCORES')
    if #first > 0 then
      firsts[p] = first
      local s = tonumber(first[2])
      if best_score == nil or s < best_score then
        best_score, best = s, { p }
      elseif s == best_score then
        best[#best + 1] = p
      end
    end
  end
  if #best == 0 then return nil end
  local i = math.floor(random_unit() * #best) + 1
  if i > #best then i = #best end
  return pick_in_pool(prefix, best[i], firsts[best[i]]), best[i]
end

local function take_slot(prefix, nid)
  rcall('HINCRBY', prefix .. 'node:' .. nid, 'running', 1)
  refresh_free(prefix, nid)
end

-- Gives one slot back, never below zero, and only on a node that is not lost.
local function release_slot(prefix, nid)
  local nkey = prefix .. 'node:' .. nid
  local state = rcall('HGET', nkey, 'state')
  if not state or state == 'lost' then return end
  if rcall('HINCRBY', nkey, 'running', -1) < 0 then rcall('HSET', nkey, 'running', 0) end
  refresh_free(prefix, nid)
end

-- Marks a job running on `nid` (whose slot the caller took) as a new attempt.
-- Returns the attempt number, the node's hub and the job's fields.
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
  -- Only while the session's hash lives: recreating an expired one would leave
  -- a key without a TTL (dispatch_task writes the hash and its TTL first).
  local skey = prefix .. 'session:' .. j[1]
  if rcall('EXISTS', skey) == 1 then
    rcall('HSET', skey, 'pool', pool, 'node', nid, 'pair', j[2] .. ':' .. j[3])
  end
  return attempt, node_hub
end

-- The full dispatch event for a job started from Redis (queue, re-dispatch).
local function dispatch_event(prefix, jid, nid, attempt, node_hub)
  local j = rcall('HMGET', prefix .. 'job:' .. jid, 'session', 'src', 'tgt', 'deadline',
    'payload', 'audio', 'shub', 'ref')
  local session_hub = rcall('HGET', prefix .. 'session:' .. j[1], 'hub') or j[7] or ''
  return { 'dispatch', node_hub, nid, jid, attempt, j[1], j[2], j[3], tonumber(j[4]),
    j[5] or '{}', j[6] or '', session_hub, j[8] or '' }
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
  -- The session's current hub (it may have resumed elsewhere), else the job's.
  local session_hub = rcall('HGET', prefix .. 'session:' .. sid, 'hub') or j[3] or ''
  return { 'result', session_hub, sid, jid, j[2] or '', status, result, err }
end

-- Takes one queued job out of its pool's queue (cancel, expiry).
local function unqueue(prefix, jid)
  local jkey = prefix .. 'job:' .. jid
  local j = rcall('HMGET', jkey, 'qpool', 'session')
  rcall('ZREM', prefix .. 'queued', jid)
  if not j[1] then return end
  local qkey = prefix .. 'queue:' .. j[1]
  local sq = qkey .. ':s:' .. j[2]
  if rcall('LREM', sq, 1, jid) > 0 then
    rcall('HINCRBY', prefix .. 'qdepth', j[1], -1)
    if rcall('LLEN', sq) == 0 then rcall('LREM', qkey, 0, j[2]) end
  end
end

-- Next queued job of a pool: sessions take turns (round robin), each
-- session's jobs leave in arrival order. Bounded: stale entries are skipped
-- at most a few times per call.
local function pop_queue(prefix, pool)
  local qkey = prefix .. 'queue:' .. pool
  for _ = 1, 8 do
    local sid = rcall('LPOP', qkey)
    if not sid then return nil end
    local sq = qkey .. ':s:' .. sid
    local jid = rcall('LPOP', sq)
    if rcall('LLEN', sq) > 0 then rcall('RPUSH', qkey, sid) end
    if jid then
      rcall('HINCRBY', prefix .. 'qdepth', pool, -1)
      rcall('ZREM', prefix .. 'queued', jid)
      if rcall('HGET', prefix .. 'job:' .. jid, 'status') == 'queued' then return jid end
    end
  end
  return nil
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

-- A running job lost its node: a new attempt on another node while the
-- deadline and max_attempts allow, else failed with `reason`.
local function lose_job(prefix, jid, nid, node_hub, now, max_attempts, ttl, reason, events)
  local jkey = prefix .. 'job:' .. jid
  local j = rcall('HMGET', jkey, 'status', 'node', 'attempt', 'deadline', 'src', 'tgt', 'session')
  if j[1] ~= 'running' or j[2] ~= nid then return end
  local attempt = tonumber(j[3]) or 1
  events[#events + 1] = { 'cancel', node_hub, nid, jid, attempt, reason }
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

-- Takes a node out of dispatch for good and settles each of its jobs.
local function lose_node(prefix, nid, now, max_attempts, ttl, events)
  local nkey = prefix .. 'node:' .. nid
  local f = rcall('HMGET', nkey, 'pools', 'hub', 'epoch')
  for _, p in ipairs(split(f[1])) do
    rcall('ZREM', prefix .. 'free:' .. p, nid)
    rcall('SREM', prefix .. 'pool:' .. p .. ':nodes', nid)
  end
  rcall('ZREM', prefix .. 'seen', nid)
  rcall('HSET', nkey, 'state', 'lost')
  local jobs = rcall('SMEMBERS', nkey .. ':jobs')
  table.sort(jobs)
  for _, jid in ipairs(jobs) do
    lose_job(prefix, jid, nid, f[2] or '', now, max_attempts, ttl, 'NODE_LOST', events)
  end
  rcall('DEL', nkey, nkey .. ':jobs')
  -- A tombstone keeps the last epoch, so the node's next registration gets a
  -- newer one and a late node_lost or heartbeat of this connection is refused
  -- (STALE_EPOCH) instead of taking the new connection down.
  if f[3] then
    rcall('HSET', nkey, 'state', 'lost', 'epoch', f[3])
    rcall('PEXPIRE', nkey, 86400000)
  end
  -- The node's hub closes the connection if it is still open (silent node).
  events[#events + 1] = { 'lost', f[2] or '', nid, tonumber(f[3]) or 0 }
  stat(prefix, 'nodes_lost')
end

-- Ends an unfinished job on the session's behalf (cancel, session gone).
-- Returns the result event, or nil when the job had already ended.
local function cancel_job(prefix, jid, reason, now, ttl, events)
  local j = rcall('HMGET', prefix .. 'job:' .. jid, 'status', 'node', 'attempt')
  if j[1] == 'queued' then
    unqueue(prefix, jid)
  elseif j[1] == 'running' then
    local node_hub = rcall('HGET', prefix .. 'node:' .. j[2], 'hub') or ''
    events[#events + 1] = { 'cancel', node_hub, j[2], jid, tonumber(j[3]), reason }
  else
    return nil
  end
  local result = end_job(prefix, jid, 'failed', 'null', reason, now, ttl)
  if j[1] == 'running' then
    rcall('SREM', prefix .. 'node:' .. j[2] .. ':jobs', jid)
    release_slot(prefix, j[2])
    fill_slots(prefix, j[2], now, events)
  end
  return result
end
