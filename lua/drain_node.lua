--[[
  A node asks to drain: it takes no new jobs and leaves when its jobs are done.

  KEYS[1]  node hash           hub:v1:{c}:node:<node_id>
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  node id (bound to the connection)
  ARGV[3]  epoch of the connection
  Returns:
     {1, running}  draining; running = jobs still to finish (0: leave now)
    -8  no such node                                     (UNKNOWN_NODE)
    -9  the node registered again on a newer connection  (STALE_EPOCH)
]]
--- @include "includes/nodes"

local node_key = KEYS[1]
local prefix = ARGV[1]
local nid = ARGV[2]

local refusal = node_refusal(node_key, ARGV[3])
if refusal then return refusal end
rcall('HSET', node_key, 'state', 'draining')
local n = refresh_free(prefix, nid)
set_live(prefix, n)
return { 1, n.running }
