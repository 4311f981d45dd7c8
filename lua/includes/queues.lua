--[[
  A pool's queue: a round-robin list of sessions with waiting jobs, and per
  session a list of its jobs in arrival order; qdepth counts the jobs.
]]
--- @include "includes/base"

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
