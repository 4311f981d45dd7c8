--[[
  What every script needs: the Redis call, repeatable randomness, the clock,
  comma lists and hash reads. (The cell's counters are the hubs' to keep:
  hub/scheduler.py counts what the scripts return.)

  Every key is built from `prefix` (ARGV[1] of each script), which carries the
  cell's hash tag, so keys derived in the includes live in the same cluster
  slot as the script's KEYS. The loader (hub/scripts.py) inlines each include
  once per script, where the script says  --- @include "includes/<name>".
]]
local rcall = redis.call

local seed = 1
local function seed_random(value)
  seed = (tonumber(value) or 1) % 2147483647
  if seed < 1 then seed = 1 end
end

-- Park-Miller generator: randomness comes in through ARGV so runs are repeatable.
local function random_unit()
  seed = (seed * 16807) % 2147483647
  return seed / 2147483647
end

-- One clock for every hub: the caller's value when given (tests), else Redis TIME.
local function now_ms(value)
  if value ~= '0' then
    local t = tonumber(value)
    if t and t > 0 then return t end
  end
  local tm = rcall('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end

-- HMGET as a table: field -> value (false when the field or the key is missing).
local function hmget(key, fields)
  local values = rcall('HMGET', key, unpack(fields))
  local out = {}
  for i, field in ipairs(fields) do out[field] = values[i] end
  return out
end

-- The fields of a job hash that starting an attempt and its dispatch event need.
local ATTEMPT_FIELDS = { 'status', 'node', 'attempt', 'hist', 'session', 'src', 'tgt',
  'deadline', 'payload', 'audio', 'shub', 'ref' }

local function split(text)
  if not text or text == '' then return {} end
  if not string.find(text, ',', 1, true) then return { text } end
  local out = {}
  for item in string.gmatch(text, '[^,]+') do out[#out + 1] = item end
  return out
end
