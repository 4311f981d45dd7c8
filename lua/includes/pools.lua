--[[
  Pools and slots: which live nodes of a pool have a free slot (the pool's
  free zset, scored by load), picking the node for a job, taking and giving
  back slots.
]]
--- @include "includes/base"

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
