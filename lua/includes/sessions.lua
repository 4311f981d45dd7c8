--[[
  A session's hash: which hub holds its socket, and where its jobs last ran.
]]
--- @include "includes/base"

-- The hub holding the session's socket now (it may have resumed elsewhere),
-- else `fallback` (the hub the job came through), else ''.
local function session_hub(prefix, sid, fallback)
  return rcall('HGET', prefix .. 'session:' .. sid, 'hub') or fallback or ''
end

-- Remembers where the session's job started, so its next job of the same
-- pair goes there first (warm context), and returns the hub holding the
-- session's socket (else `fallback`, else ''). Only while the session's hash
-- lives: recreating an expired one would leave a key without a TTL
-- (dispatch_task writes the hash with its TTL; every hash has 'hub').
local function remember_node(prefix, sid, pool, nid, pair, fallback)
  local skey = prefix .. 'session:' .. sid
  local hub = rcall('HGET', skey, 'hub')
  if not hub then return fallback or '' end
  rcall('HSET', skey, 'pool', pool, 'node', nid, 'pair', pair)
  return hub
end
