-- Spends one send of every rule, or none: GCRA on Redis's clock.
-- KEYS: one per rule. ARGV: 1 rules ('T,tau;…'), 2 clock offset ms.
-- Returns {1} | {2, retry ms, rule}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local tats = {}
local i = 0
for spec in string.gmatch(ARGV[1], '[^;]+') do
  i = i + 1
  local emission, tolerance = string.match(spec, '(%d+),(%d+)')
  emission, tolerance = tonumber(emission), tonumber(tolerance)
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  if now < tat - tolerance then return {2, tat - tolerance - now, i} end
  tats[i] = tat + emission
end
for j = 1, i do
  redis.call('SET', KEYS[j], string.format('%d', tats[j]), 'PX', string.format('%d', math.max(1, tats[j] - now)))
end
return {1}
