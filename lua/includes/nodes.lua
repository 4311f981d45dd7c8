--[[
  A node's registration: the epoch that fences its connections, and taking
  a node out for good.
]]
--- @include "includes/base"
--- @include "includes/events"
--- @include "includes/jobs"

-- Whether a connection of the node in `nkey` with `epoch` (ARGV text; nil:
-- any) may act for it: nil and the node's state when it may, else -8 (not
-- registered: lost or never) or -9 (registered again on a newer connection).
local function node_refusal(nkey, epoch)
  local f = rcall('HMGET', nkey, 'epoch', 'state')
  if not f[1] or f[2] == 'lost' then return -8 end
  if epoch and f[1] ~= epoch then return -9 end
  return nil, f[2]
end

-- Takes a node out of dispatch for good and settles each of its jobs.
local function lose_node(prefix, nid, now, max_attempts, ttl, events)
  local nkey = prefix .. 'node:' .. nid
  local f = rcall('HMGET', nkey, 'pools', 'hub', 'epoch', 'lpairs')
  for _, p in ipairs(split(f[1])) do
    rcall('ZREM', prefix .. 'free:' .. p, nid)
    rcall('SREM', prefix .. 'pool:' .. p .. ':nodes', nid)
  end
  set_live(prefix, { id = nid, state = 'lost', pairs = split(f[4]) })
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
  events[#events + 1] = lost_event(f[2] or '', nid, tonumber(f[3]) or 0)
end
