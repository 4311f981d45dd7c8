--[[
  A pool's queue: a round-robin list of sessions with waiting jobs, and per
  session a list of its jobs in arrival order; qdepth counts the jobs.
]]
--- @include "includes/base"

-- Takes queued job `jid` out of pool `qpool`'s queue (cancel, expiry);
-- `sid` is its session. A job without a queue only leaves the queued zset.
local function unqueue(prefix, jid, qpool, sid)
  rcall('ZREM', prefix .. 'queued', jid)
  if not qpool then return end
  local qkey = prefix .. 'queue:' .. qpool
  local sq = qkey .. ':s:' .. sid
  if rcall('LREM', sq, 1, jid) > 0 then
    rcall('HINCRBY', prefix .. 'qdepth', qpool, -1)
    if rcall('LLEN', sq) == 0 then rcall('LREM', qkey, 0, sid) end
  end
end

-- Next queued job of a pool: sessions take turns (round robin), each
-- session's jobs leave in arrival order. Bounded: stale entries are skipped
-- at most a few times per call. Returns the job id and its ATTEMPT_FIELDS
-- (nil when none), then the pool's queue depth as last counted (0 when the
-- queue ran out).
local function pop_queue(prefix, pool)
  local qkey = prefix .. 'queue:' .. pool
  local depth = 0
  for _ = 1, 8 do
    local sid = rcall('LPOP', qkey)
    if not sid then return nil, nil, 0 end
    local sq = qkey .. ':s:' .. sid
    local jid = rcall('LPOP', sq)
    if rcall('LLEN', sq) > 0 then rcall('RPUSH', qkey, sid) end
    if jid then
      depth = rcall('HINCRBY', prefix .. 'qdepth', pool, -1)
      rcall('ZREM', prefix .. 'queued', jid)
      local j = hmget(prefix .. 'job:' .. jid, ATTEMPT_FIELDS)
      if j.status == 'queued' then return jid, j, depth end
    end
  end
  return nil, nil, depth
end
