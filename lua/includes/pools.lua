--[[
  Pools and slots: which live nodes of a pool have a free slot (the pool's
  free zset, scored by load), picking the node for a job, taking and giving
  back slots.

  A script reads a node's hash once (read_node) and keeps the table up to
  date as it takes and gives back slots, so later steps need not read again.
]]
--- @include "includes/base"

-- The scheduling fields of node `nid`: id, key, running, max_jobs, state
-- (false: no such node), pools (list) and hub.
local function read_node(prefix, nid)
  local key = prefix .. 'node:' .. nid
  local f = rcall('HMGET', key, 'running', 'max_jobs', 'state', 'pools', 'hub')
  return { id = nid, key = key, running = tonumber(f[1]) or 0, max_jobs = tonumber(f[2]) or 0,
    state = f[3], pools = split(f[4]), hub = f[5] or '' }
end

-- A node is in the free zset of each of its pools exactly when it is live and
-- has a free slot; its score is its load, running / max_jobs. `n` is the
-- node as read_node returns it, kept up to date by the caller.
local function set_free(prefix, n)
  local free = n.state == 'live' and n.running < n.max_jobs
  for _, pool in ipairs(n.pools) do
    if free then
      rcall('ZADD', prefix .. 'free:' .. pool, n.running / n.max_jobs, n.id)
    else
      rcall('ZREM', prefix .. 'free:' .. pool, n.id)
    end
  end
end

-- set_free for a node the script has not read yet; returns the node.
local function refresh_free(prefix, nid)
  local n = read_node(prefix, nid)
  set_free(prefix, n)
  return n
end

-- Least-loaded node of one pool, ties broken at random: O(log N).
-- `first` is the pool's ZRANGE 0 1 WITHSCORES when the caller read it already.
local function pick_in_pool(prefix, pool, first)
  local fkey = prefix .. 'free:' .. pool
  first = first or rcall('ZRANGE', fkey, 0, 1, 'WITHSCORES')
  if #first == 0 then return nil end
  -- The second lowest is higher: no tie, no need to count.
  if #first == 2 or first[4] ~= first[2] then return first[1] end
  local ties = rcall('ZCOUNT', fkey, first[2], first[2])
  local i = math.floor(random_unit() * ties)
  if i >= ties then i = ties - 1 end
  if i == 0 then return first[1] end
  if i == 1 then return first[3] end
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
    local first = rcall('ZRANGE', prefix .. 'free:' .. p, 0, 1, 'WITHSCORES')
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

-- Takes one slot of node `n` (as read_node returns it) and updates its free entries.
local function take_slot(prefix, n)
  n.running = rcall('HINCRBY', n.key, 'running', 1)
  set_free(prefix, n)
end

-- Gives one slot of node `n` back, never below zero, and only on a node that
-- is not lost; the caller updates the free entries (set_free). Returns
-- whether it did.
local function release_slot(n)
  if not n.state or n.state == 'lost' then return false end
  n.running = rcall('HINCRBY', n.key, 'running', -1)
  if n.running < 0 then
    rcall('HSET', n.key, 'running', 0)
    n.running = 0
  end
  return true
end
