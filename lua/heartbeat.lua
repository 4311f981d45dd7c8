--[[
  Record that nodes are alive (many nodes in one call), with their load.

  KEYS[1]  lease zset          hub:v1:{c}:seen
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2]  now in ms (0 = Redis TIME)
  ARGV[3]  random seed
  ARGV[4+5i..8+5i], one group per node:
           node id, epoch of the connection, online flag (1 | 0),
           load JSON object ('' = unchanged), round trip ms ('' = unknown)
  ARGV[#ARGV], after the groups: ended job record TTL in ms
  Returns:
    {{r1, r2, ...}, {events}}: a code per node, then 'dispatch' events for
    queued jobs handed to nodes that came back online ('result', JOB_TIMEOUT,
    for queued jobs found past their deadline). Codes:
     1  recorded
     0  online flag 0 recorded: the node takes no new jobs until a heartbeat with 1
    -8  no such node (lost or never registered): close and re-register (UNKNOWN_NODE)
    -9  the node registered again on a newer connection (STALE_EPOCH)
]]
--- @include "includes/nodes"

local seen_key = KEYS[1]
local prefix = ARGV[1]
local now = now_ms(ARGV[2])
seed_random(ARGV[3])
local ttl = tonumber(ARGV[#ARGV])

local out = {}
local events = {}
for i = 4, #ARGV - 5, 5 do
  local nid, epoch, online, load, rtt = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local nkey = prefix .. 'node:' .. nid
  local refusal, state = node_refusal(nkey, epoch)
  if refusal then
    out[#out + 1] = refusal
  else
    local fields = { 'seen', now }
    if load ~= '' then fields[#fields + 1] = 'load'; fields[#fields + 1] = load end
    if rtt ~= '' then fields[#fields + 1] = 'rtt_ms'; fields[#fields + 1] = rtt end
    if online == '0' and state == 'live' then
      fields[#fields + 1] = 'state'; fields[#fields + 1] = 'offline'
    elseif online ~= '0' and state == 'offline' then
      fields[#fields + 1] = 'state'; fields[#fields + 1] = 'live'
    end
    rcall('HSET', nkey, unpack(fields))
    rcall('ZADD', seen_key, now, nid)
    if online == '0' then
      if state == 'live' then set_live(prefix, refresh_free(prefix, nid)) end
      out[#out + 1] = 0
    else
      -- Back online: its free slots take the jobs waiting for its pairs.
      if state == 'offline' then
        local n = read_node(prefix, nid)
        set_live(prefix, n)
        fill_slots(prefix, n, now, ttl, events)
      end
      out[#out + 1] = 1
    end
  end
end
return { out, events }
