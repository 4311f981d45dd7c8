--[[
  Pools and slots: which live nodes of a pool have a free slot (the pool's
  free zset, scored by load), picking the node for a job, taking and giving
  back slots.

  A script reads a node's hash once (read_node) and keeps the table up to
  date as it takes and gives back slots, so later steps need not read again.
]]
--- @include "includes/base"

-- The scheduling fields of node `nid`: id, key, running, max_jobs, state
-- (false: no such node), pools (list), hub and pairs (list of "src:tgt").
local function read_node(prefix, nid)
  local key = prefix .. 'node:' .. nid
  local f = rcall('HMGET', key, 'running', 'max_jobs', 'state', 'pools', 'hub', 'lpairs')
  return { id = nid, key = key, running = tonumber(f[1]) or 0, max_jobs = tonumber(f[2]) or 0,
    state = f[3], pools = split(f[4]), hub = f[5] or '', pairs = split(f[6]) }
end

-- A node is in the live set of each of its language pairs exactly when its
-- state is 'live' (not offline, draining or lost): dispatch_task queues a
-- job only while its pair's set is not empty, and refuses it EMPTY_POOL
-- otherwise. Called on every change of state; `n` as read_node returns it.
local function set_live(prefix, n)
  local op = (n.state == 'live') and 'SADD' or 'SREM'
  for _, pair in ipairs(n.pairs) do rcall(op, prefix .. 'live:' .. pair, n.id) end
end

-- A free node's score is an integer, so a small (listpack) zset compares
-- scores without parsing decimals: its load level, running / max_jobs in
-- 2^20ths (distinct loads get distinct levels while max_jobs <= 1024),
-- times LEVEL, plus a random tie-break below LEVEL drawn each time the
-- score is set. The lowest score is a least-loaded node chosen at random
-- (pick_lowest flips a coin between the two lowest when they tie, so a node
-- that drew a high tie-break is not passed over until its load changes).
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

-- A least-loaded node of a pool's free zset `fkey`, and its score; nil when none.
-- O(log N): the two lowest scores only.
local function pick_lowest(fkey)
  local first = rcall('ZRANGE', fkey, 0, 1, 'WITHSCORES')
  if #first == 4 and math.floor(tonumber(first[2]) / LEVEL) == math.floor(tonumber(first[4]) / LEVEL)
      and random_unit() < 0.5 then
    return first[3], tonumber(first[4])
  end
  return first[1], tonumber(first[2])
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
      local nid = pick_lowest(fkey)
      if nid then return nid, pref_pool end
    end
  end
  if #pools == 1 then
    local nid = pick_lowest(prefix .. 'free:' .. pools[1])
    if nid then return nid, pools[1] end
    return nil
  end
  -- Pools whose lowest nodes are at the same level: one of them at random.
  local best, best_level, best_pool, ties = nil, nil, nil, 0
  for _, p in ipairs(pools) do
    local nid, score = pick_lowest(prefix .. 'free:' .. p)
    if nid then
      local level = math.floor(score / LEVEL)
      if best_level == nil or level < best_level then
        best, best_level, best_pool, ties = nid, level, p, 1
      elseif level == best_level then
        ties = ties + 1
        if random_unit() * ties < 1 then best, best_pool = nid, p end
      end
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
