--[[
  Accept a session's job: run it on the least-loaded live node with a free
  slot, or queue it for a slot, or refuse it. A job waits in its language
  pair's queue, which a freed slot in any pool of the pair serves, and only
  while a live node serves the pair (offline, draining and lost nodes do not
  count).

  KEYS[1]  pools of the pair   hub:v1:{c}:lang:<src>:<tgt>
  KEYS[2]  session hash        hub:v1:{c}:session:<session_id>
  KEYS[3]  job hash            hub:v1:{c}:job:<job_id>
  KEYS[4]  deadlines zset      hub:v1:{c}:deadlines
  KEYS[5]  session's jobs set  hub:v1:{c}:session:<session_id>:jobs
  KEYS[6]  queue waits zset    hub:v1:{c}:queued
  KEYS[7]  queue depths hash   hub:v1:{c}:qdepth
  KEYS[8]  pair's live nodes   hub:v1:{c}:live:<src>:<tgt>
  KEYS[9]  pair's queue        hub:v1:{c}:queue:<src>:<tgt>
  KEYS[10] session's queue     hub:v1:{c}:queue:<src>:<tgt>:s:<session_id>
  KEYS[11] queue heads zset    hub:v1:{c}:qheads
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  job id (random, made by the hub)
  ARGV[3]  session id (bound to the connection)
  ARGV[4]  source language
  ARGV[5]  target language
  ARGV[6]  payload, JSON object text
  ARGV[7]  '1' when the job has audio, which its hub (ARGV[12]) keeps; '' none
  ARGV[8]  time budget in ms from acceptance
  ARGV[9]  queue wait in ms (0 = never queue)
  ARGV[10] queue_max, per language pair
  ARGV[11] random seed
  ARGV[12] hub id of the session's connection
  ARGV[13] the session's ref for the job
  ARGV[14] now in ms (0 = Redis TIME)
  ARGV[15] max queued jobs per session
  ARGV[16] session record TTL in ms (renewed once half of it has passed)
  Returns:
     {1, node_id, attempt, node_hub, deadline_ms}  accepted: the slot is taken
     {0, 'src:tgt', deadline_ms}                    queued: waits for a slot
    -1  no pool serves the pair                    (NO_POOL_FOR_LANG_PAIR)
    -2  no live node serves the pair               (EMPTY_POOL)
    -3  every node busy and queueing is off        (NO_AVAILABLE_NODE)
    -4  the pair's queue is full                   (QUEUE_FULL)
   -11  the session has too many queued jobs       (SESSION_QUEUE_FULL)
]]
--- @include "includes/jobs"

local lang_key = KEYS[1]
local session_key = KEYS[2]
local job_key = KEYS[3]
local deadlines_key = KEYS[4]
local session_jobs_key = KEYS[5]
local queued_key = KEYS[6]
local depth_key = KEYS[7]
local live_key = KEYS[8]
local queue_key = KEYS[9]
local session_queue_key = KEYS[10]
local heads_key = KEYS[11]
local prefix = ARGV[1]
local jid = ARGV[2]
local sid = ARGV[3]
local src, tgt = ARGV[4], ARGV[5]
seed_random(ARGV[11])
local now = now_ms(ARGV[14])

local pools = rcall('SMEMBERS', lang_key)
if #pools == 0 then return -1 end
table.sort(pools)

local pair = src .. ':' .. tgt
local s = rcall('HMGET', session_key, 'pool', 'node', 'pair', 'renew', 'hub')
local pref_pool, pref_node = nil, nil
if s[3] == pair then pref_pool, pref_node = s[1] or nil, s[2] or nil end

local nid, pool = pick_node(prefix, pools, pref_pool, pref_node)
local deadline = now + tonumber(ARGV[8])

-- Adds the job to the session's jobs and records the session's hub (and,
-- for a job that started, where: the fields given): writes the session's
-- hash only when something changed. The hash and the jobs set live while
-- the session is active: their TTL is renewed once half of it has passed
-- (the hash's 'renew' time). The jobs set is gone whenever empty; a job that creates it
-- between renewals leaves it without a TTL until the next renewal, which
-- is safe: each of its jobs ends by its deadline and leaves it.
local function track_session(...)
  rcall('SADD', session_jobs_key, jid)
  if now >= (tonumber(s[4]) or 0) then
    local ttl = tonumber(ARGV[16])
    rcall('HSET', session_key, 'hub', ARGV[12], 'renew', now + math.floor(ttl / 2), ...)
    rcall('PEXPIRE', session_key, ttl)
    rcall('PEXPIRE', session_jobs_key, ttl)
  elseif s[5] ~= ARGV[12] or (nid and (s[1] ~= pool or s[2] ~= nid or s[3] ~= pair)) then
    rcall('HSET', session_key, 'hub', ARGV[12], ...)
  end
end

if nid then
  local n = read_node(prefix, nid)
  take_slot(prefix, n)
  rcall('HSET', job_key, 'session', sid, 'ref', ARGV[13], 'src', src, 'tgt', tgt,
    'payload', ARGV[6], 'deadline', deadline, 'shub', ARGV[12], 'status', 'running',
    'attempt', 1, 'audio', ARGV[7], 'node', nid, 'hist', ',' .. nid .. '@1,')
  rcall('ZADD', deadlines_key, deadline, jid)
  rcall('SADD', n.key .. ':jobs', jid)
  track_session('pool', pool, 'node', nid, 'pair', pair)
  return { 1, nid, 1, n.hub, deadline }
end

-- No free slot: a busy fleet (a live node serves the pair) queues, an empty one refuses.
if rcall('SCARD', live_key) == 0 then return -2 end
local queue_wait = tonumber(ARGV[9])
if queue_wait <= 0 then return -3 end
if (tonumber(rcall('HGET', depth_key, pair)) or 0) >= tonumber(ARGV[10]) then return -4 end
local waiting = rcall('LLEN', session_queue_key)
if waiting >= tonumber(ARGV[15]) then return -11 end

rcall('HSET', job_key, 'session', sid, 'ref', ARGV[13], 'src', src, 'tgt', tgt,
  'payload', ARGV[6], 'deadline', deadline, 'shub', ARGV[12], 'status', 'queued',
  'attempt', 0, 'audio', ARGV[7])
rcall('ZADD', deadlines_key, deadline, jid)
track_session()
rcall('RPUSH', session_queue_key, jid)
if waiting == 0 then rcall('RPUSH', queue_key, sid) end
-- The pair's head when its queue was empty; NX: else the head is older. (A
-- lost heads entry is restored this way too, a little late in the order.)
rcall('ZADD', heads_key, 'NX', now + queue_wait, pair)
rcall('HINCRBY', depth_key, pair, 1)
rcall('ZADD', queued_key, now + queue_wait, jid)
return { 0, pair, deadline }
