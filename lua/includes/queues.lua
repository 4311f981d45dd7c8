--[[
  The queues: one per language pair, so a freed slot in any pool that serves
  the pair can take a waiting job. A pair's queue is a round-robin list of
  sessions with waiting jobs, and per session a list of its jobs in arrival
  order; qdepth counts each pair's waiting jobs (no entry when none), and
  qheads holds, for each pair with waiting jobs, when the queue wait of its
  head ends (the job the pair hands out next), so that a freed slot finds
  the head that waited longest among its node's pairs in one ZMSCORE.
]]
--- @include "includes/base"

-- Adds `by` to pair's queued jobs count; drops the entry at 0.
local function count_queued(prefix, pair, by)
  local depth = rcall('HINCRBY', prefix .. 'qdepth', pair, by)
  if depth <= 0 then rcall('HDEL', prefix .. 'qdepth', pair) end
end

-- Records in qheads when the queue wait of pair's head job ends (0 for a
-- stale entry, so the next pop skips it first); no entry when the queue is
-- empty. Returns that time, or nil.
local function update_head(prefix, pair)
  local qkey = prefix .. 'queue:' .. pair
  local sid = rcall('LINDEX', qkey, 0)
  if not sid then
    rcall('ZREM', prefix .. 'qheads', pair)
    return nil
  end
  local jid = rcall('LINDEX', qkey .. ':s:' .. sid, 0)
  local at = (jid and tonumber(rcall('ZSCORE', prefix .. 'queued', jid))) or 0
  rcall('ZADD', prefix .. 'qheads', at, pair)
  return at
end

-- Takes queued job `jid` of session `sid` out of the queue of `pair`
-- ("src:tgt"): cancelled, expired.
local function unqueue(prefix, jid, pair, sid)
  rcall('ZREM', prefix .. 'queued', jid)
  local qkey = prefix .. 'queue:' .. pair
  local sq = qkey .. ':s:' .. sid
  if rcall('LREM', sq, 1, jid) > 0 then
    count_queued(prefix, pair, -1)
    if rcall('LLEN', sq) == 0 then rcall('LREM', qkey, 0, sid) end
    update_head(prefix, pair)
  end
end

-- Next queued job of a pair: sessions take turns (round robin), each
-- session's jobs leave in arrival order. Bounded: stale entries are skipped
-- at most a few times per call. Returns the job id and its ATTEMPT_FIELDS
-- (nil when none), then the pair's new head time (update_head).
local function pop_queue(prefix, pair)
  local qkey = prefix .. 'queue:' .. pair
  for _ = 1, 8 do
    local sid = rcall('LPOP', qkey)
    if not sid then break end
    local sq = qkey .. ':s:' .. sid
    local jid = rcall('LPOP', sq)
    if rcall('LLEN', sq) > 0 then rcall('RPUSH', qkey, sid) end
    if jid then
      count_queued(prefix, pair, -1)
      rcall('ZREM', prefix .. 'queued', jid)
      local j = hmget(prefix .. 'job:' .. jid, ATTEMPT_FIELDS)
      if j.status == 'queued' then return jid, j, update_head(prefix, pair) end
    end
  end
  return nil, nil, update_head(prefix, pair)
end
