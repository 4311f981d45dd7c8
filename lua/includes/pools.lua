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

-- A free node's score is an integer, so a small (listpack) zset compares
-- scores without parsing decimals: its load level, running / max_jobs in
-- 2^20ths (distinct loads get distinct levels while max_jobs <= 1024),
-- times LEVEL, plus a random tie-break below LEVEL drawn each time the
-- score is set. The lowest score is a least-loaded node chosen at random.
-- Scores stay below 2^51: exact in a double, stored as integers.
local LEVEL = 2 ^ 31

local function free_score(n)
  local level = math.floor(n.running * 1048576 / n.max_jobs)
  return level * LEVEL + math.floor(random_unit() * LEVEL)
end

-- A node is in the free zset of each of its pools exactly when it is live and
-- has a free slot, scored by free_score. `n` is the node as read_node
-- returns it, kept up to date by the caller.
local function set_free(prefix, n)
  local free = n.state == 'live' and n.running < n.max_jobs
  for _, pool in ipairs(n.pools) do
    if free then
      rcall('ZADD', prefix .. 'free:' .. pool, free_score(n), n.id)
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

-- Choose a node for a language pair served by `pools` (sorted list of pool ids):
-- a least-loaded one, at random among equals (the lowest score, O(log N)).
-- The session's previous node first (warm context), then its preferred pool,
-- then the pool whose least-loaded node is least loaded. Returns node, pool.
local function pick_node(prefix, pools, pref_pool, pref_node)
  if pref_pool then
    local serves = false
    for _, p in ipairs(pools) do if p == pref_pool then serves = true end end
    if serves then
      local fkey = prefix .. 'free:' .. pref_pool
      if pref_node and rcall('ZSCORE', fkey, pref_node) then return pref_node, pref_pool end
      local first = rcall('ZRANGE', fkey, 0, 0)[1]
      if first then return first, pref_pool end
    end
  end
  if #pools == 1 then
    local first = rcall('ZRANGE', prefix .. 'free:' .. pools[1], 0, 0)[1]
    if first then return first, pools[1] end
    return nil
  end
  local best, best_score, best_pool = nil, nil, nil
  for _, p in ipairs(pools) do
    local first = rcall('ZRANGE', prefix .. 'free:' .. p, 0, 0, 'WITHSCORES')
    if #first > 0 and (best_score == nil or tonumber(first[2]) < best_score) then
      best, best_score, best_pool = first[1], tonumber(first[2]), p
    end
  end
  return best, best_pool
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
