--[[
  A session acknowledges results it received: a later resume will not send
  them again.

  KEYS[1]  ended jobs zset     hub:v1:{c}:session:<session_id>:done
  ARGV[1]  key prefix          hub:v1:{c}:
  ARGV[2..] job ids (of the session bound to the connection)
  Returns:
     n  how many of the ids were pending acknowledgement (0 when none)
]]
local done_key = KEYS[1]
if #ARGV < 2 then return 0 end
return redis.call('ZREM', done_key, unpack(ARGV, 2))
