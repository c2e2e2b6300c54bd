-- GCRA on Redis's clock: the one copy, put in front of the scripts that spend sends (the
-- `GCRA` script, lua/limits.lua, and `COMMIT`).
-- Spends one send of every rule, or none. `rules` is 'emission,tolerance;…' in ms, one rule
-- each (gcra_rules in limits.rs writes it); the rules' keys are KEYS[first_key] onwards, each
-- holding its theoretical arrival time; `clock_offset_ms` is added to Redis's TIME. With
-- `peek` true nothing is spent: only whether one more would be allowed.
-- Returns nil when spent, or {2, retry ms, rule} (rule counted from 1) when a rule refuses.
local function gcra(rules, first_key, clock_offset_ms, peek)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(clock_offset_ms)
  local tats = {}
  local i = 0
  for spec in string.gmatch(rules, '[^;]+') do
    i = i + 1
    local emission, tolerance = string.match(spec, '(%d+),(%d+)')
    emission, tolerance = tonumber(emission), tonumber(tolerance)
    local tat = tonumber(redis.call('GET', KEYS[first_key + i - 1])) or now
    if tat < now then tat = now end
    if now < tat - tolerance then return {2, tat - tolerance - now, i} end
    tats[i] = tat + emission
  end
  if peek then return nil end
  for j = 1, i do
    local key = KEYS[first_key + j - 1]
    redis.call('SET', key, string.format('%d', tats[j]), 'PX', string.format('%d', math.max(1, tats[j] - now)))
  end
  return nil
end
