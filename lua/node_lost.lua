--[[
  A node is gone (its socket closed, or it finished draining): take it out of
  dispatch and settle each job it was running, once.

  KEYS[1]  node hash           hub:v1:{c}:node:<node_id>
  KEYS[2]  node's jobs set     hub:v1:{c}:node:<node_id>:jobs
  KEYS[3]  lease zset          hub:v1:{c}:seen
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  node id
  ARGV[3]  epoch of the connection that closed ('' = whatever is registered)
  ARGV[4]  now in ms (0 = Redis TIME)
  ARGV[5]  max attempts per job
  ARGV[6]  ended job record TTL in ms
  ARGV[7]  random seed
  Returns:
     {1, {events}}  lost; for each of its jobs a 'cancel' for the node, then a
                    'dispatch' (new attempt elsewhere) or a 'result' (NODE_LOST);
                    last a 'lost' for the node's hub (close its socket if open)
    -8  no such node: already lost                     (UNKNOWN_NODE)
    -9  the node registered again on a newer connection: nothing changed
                                                       (STALE_EPOCH)
]]
--- @include "includes/nodes"

local node_key = KEYS[1]
local prefix = ARGV[1]
local nid = ARGV[2]
seed_random(ARGV[7])
local now = now_ms(ARGV[4])

local epoch = ARGV[3]
if epoch == '' then epoch = nil end
local refusal = node_refusal(node_key, epoch)
if refusal then return refusal end
local events = {}
lose_node(prefix, nid, now, tonumber(ARGV[5]), tonumber(ARGV[6]), events)
return { 1, events }
