--[[
  Record that a session of this cell may have jobs in another cell (a job
  spilled there), before the first such job is sent there: a resume then
  looks for the session's jobs in that cell too.

  KEYS[1]  session's cells set hub:v1:{c}:session:<session_id>:cells
  ARGV[1]  the other cell
  ARGV[2]  session record TTL in ms
  Returns:
     1  the cell is new to the set
     0  it was there already (its TTL is renewed)
]]
local cells_key = KEYS[1]
local added = redis.call('SADD', cells_key, ARGV[1])
redis.call('PEXPIRE', cells_key, tonumber(ARGV[2]))
return added
