--[[
  Register a node (first connection or a reconnection) and make it dispatchable.

  KEYS[1]  node hash           hub:v1:{c}:node:<node_id>
  KEYS[2]  node's jobs set     hub:v1:{c}:node:<node_id>:jobs
  KEYS[3]  lease zset          hub:v1:{c}:seen
  KEYS[4]  all pools set       hub:v1:{c}:pools
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  node id (bound to the connection)
  ARGV[3]  hub id the node is connected to
  ARGV[4]  max_jobs
  ARGV[5]  services, JSON array (for status)
  ARGV[6]  language pairs, JSON array of [src, tgt] (for status)
  ARGV[7]  pool ids, comma-separated (operator pool + capability signature)
  ARGV[8]  language pairs, comma-separated "src:tgt", sorted (the lang:<src>:<tgt> sets
           to join, the live:<src>:<tgt> sets and the pair queues to take jobs from)
  ARGV[9]  job ids the node is still running and wants to keep, comma-separated
  ARGV[10] now in ms (0 = Redis TIME)
  ARGV[11] max attempts per job
  ARGV[12] ended job record TTL in ms
  ARGV[13] random seed
  ARGV[14] operator pools, JSON array (for status)
  Returns:
    {epoch, {resumed job ids}, {dropped job ids}, {events}}
      epoch    this connection's registration number (fences heartbeats)
      resumed  jobs that stay on the node
      dropped  jobs the node named that are no longer its own: it must stop them
      events   'replaced' for the previous live connection of this node id,
               'cancel'/'dispatch'/'result' for jobs it had but did not resume,
               'dispatch' for queued jobs of its pairs handed to its free slots,
               'result' (JOB_TIMEOUT) for queued jobs found past their deadline
]]
--- @include "includes/jobs"

local node_key = KEYS[1]
local jobs_key = KEYS[2]
local seen_key = KEYS[3]
local pools_key = KEYS[4]
local prefix = ARGV[1]
local nid = ARGV[2]
local hub_id = ARGV[3]
local now = now_ms(ARGV[10])
local max_attempts = tonumber(ARGV[11])
local ttl = tonumber(ARGV[12])
seed_random(ARGV[13])

local events = {}
local old = rcall('HMGET', node_key, 'epoch', 'hub', 'state', 'pools', 'lpairs')
local epoch = (tonumber(old[1]) or 0) + 1
if old[3] and old[3] ~= 'lost' then
  events[#events + 1] = replaced_event(old[2] or '', nid, tonumber(old[1]) or 0)
end

-- Out of the old pools first, so the node is never picked for its own lost jobs.
for _, p in ipairs(split(old[4])) do
  rcall('ZREM', prefix .. 'free:' .. p, nid)
  rcall('SREM', prefix .. 'pool:' .. p .. ':nodes', nid)
end
set_live(prefix, { id = nid, state = 'lost', pairs = split(old[5]) })
rcall('HSET', node_key, 'state', 'lost')

local wanted = {}
for _, jid in ipairs(split(ARGV[9])) do wanted[jid] = true end
local resumed, dropped = {}, {}
local current = rcall('SMEMBERS', jobs_key)
table.sort(current)
for _, jid in ipairs(current) do
  local j = rcall('HMGET', prefix .. 'job:' .. jid, 'status', 'node')
  if j[1] == 'running' and j[2] == nid and wanted[jid] then
    resumed[#resumed + 1] = jid
    wanted[jid] = nil
  else
    rcall('SREM', jobs_key, jid)
    lose_job(prefix, jid, nid, old[2] or '', now, max_attempts, ttl, 'NODE_LOST', events)
  end
end
for _, jid in ipairs(split(ARGV[9])) do
  if wanted[jid] then dropped[#dropped + 1] = jid end
end

rcall('HSET', node_key, 'hub', hub_id, 'epoch', epoch, 'max_jobs', ARGV[4], 'services', ARGV[5],
  'pairs', ARGV[6], 'pools', ARGV[7], 'opools', ARGV[14], 'state', 'live', 'running', #resumed,
  'seen', now, 'registered', now, 'lpairs', ARGV[8])
rcall('PERSIST', node_key)
for _, p in ipairs(split(ARGV[7])) do
  rcall('SADD', prefix .. 'pool:' .. p .. ':nodes', nid)
  rcall('SADD', pools_key, p)
  for _, pair in ipairs(split(ARGV[8])) do
    rcall('SADD', prefix .. 'lang:' .. pair, p)
  end
end
rcall('ZADD', seen_key, now, nid)
local n = { id = nid, key = node_key, running = #resumed, max_jobs = tonumber(ARGV[4]),
  state = 'live', pools = split(ARGV[7]), hub = hub_id, pairs = split(ARGV[8]) }
set_live(prefix, n)
fill_slots(prefix, n, now, ttl, events)
return { epoch, resumed, dropped, events }
