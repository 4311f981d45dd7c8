--[[
  A session acknowledges results it received: a later resume will not send
  them again.

  KEYS[1]  ended jobs zset     hub:v1:{c}:session:<session_id>:done
  KEYS[2]  session hash        hub:v1:{c}:session:<session_id>
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2..] job ids (of the session bound to the connection)
  Returns:
     n  how many of the ids were pending acknowledgement (0 when none)
]]
local done_key = KEYS[1]
if #ARGV < 2 then return 0 end
local n = redis.call('ZREM', done_key, unpack(ARGV, 2))
-- Emptied: Redis deleted the zset, so the next end must give it a TTL again.
if n > 0 and redis.call('EXISTS', done_key) == 0 then
  redis.call('HDEL', KEYS[2], 'done_renew')
end
return n
