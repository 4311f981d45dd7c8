--[[
  Expire what ran out of time, in bounded batches: overdue jobs (JOB_TIMEOUT),
  queued jobs that waited too long (NO_AVAILABLE_NODE), and nodes whose lease
  ran out (lost, as in node_lost). Safe when several hubs run it at once; a
  short lease lets one hub do the work while the others skip.

  KEYS[1]  deadlines zset      hub:v1:{c}:deadlines
  KEYS[2]  queue waits zset    hub:v1:{c}:queued
  KEYS[3]  lease zset          hub:v1:{c}:seen
  KEYS[4]  sweep lease         hub:v1:{c}:sweep
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  now in ms (0 = Redis TIME)
  ARGV[3]  node lease in ms
  ARGV[4]  batch: most jobs and most nodes handled per call
  ARGV[5]  max attempts per job
  ARGV[6]  ended job record TTL in ms
  ARGV[7]  random seed
  ARGV[8]  hub id running the sweep
  ARGV[9]  sweep lease in ms (0 = no lease: always run)
  Returns:
     {1, timed_out, queue_expired, nodes_lost, {events}}  swept
     {0, 0, 0, 0, {}}  another hub holds the sweep lease: nothing done
]]
--- @include "includes/nodes"

local deadlines_key = KEYS[1]
local queued_key = KEYS[2]
local seen_key = KEYS[3]
local lease_key = KEYS[4]
local prefix = ARGV[1]
local now = now_ms(ARGV[2])
local node_lease = tonumber(ARGV[3])
local batch = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
seed_random(ARGV[7])
local hub_id = ARGV[8]
local lease_ms = tonumber(ARGV[9])

if lease_ms > 0 then
  local holder = rcall('GET', lease_key)
  if holder and holder ~= hub_id then return { 0, 0, 0, 0, {} } end
  rcall('SET', lease_key, hub_id, 'PX', lease_ms)
end

local events = {}
local timed_out, queue_expired, nodes_lost = 0, 0, 0

-- Each result right after its job's cancel, before the freed slot's dispatches.
for _, jid in ipairs(rcall('ZRANGEBYSCORE', deadlines_key, '-inf', now, 'LIMIT', 0, batch)) do
  if cancel_job(prefix, jid, 'JOB_TIMEOUT', now, ttl, events, events) then
    timed_out = timed_out + 1
  else
    rcall('ZREM', deadlines_key, jid)
  end
end

for _, jid in ipairs(rcall('ZRANGEBYSCORE', queued_key, '-inf', now, 'LIMIT', 0, batch)) do
  local j = hmget(prefix .. 'job:' .. jid, ATTEMPT_FIELDS)
  if j.status == 'queued' then
    cancel_job(prefix, jid, 'NO_AVAILABLE_NODE', now, ttl, events, events, j)
    queue_expired = queue_expired + 1
  else
    rcall('ZREM', queued_key, jid)
  end
end

for _, nid in ipairs(rcall('ZRANGEBYSCORE', seen_key, '-inf', now - node_lease, 'LIMIT', 0, batch)) do
  local state = rcall('HGET', prefix .. 'node:' .. nid, 'state')
  if state and state ~= 'lost' then
    lose_node(prefix, nid, now, max_attempts, ttl, events)
    nodes_lost = nodes_lost + 1
  else
    rcall('ZREM', seen_key, nid)
  end
end

return { 1, timed_out, queue_expired, nodes_lost, events }
