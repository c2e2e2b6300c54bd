-- GCRA: spends one send of every rule, or none, on Redis's clock (gcra.lua is put in front).
-- KEYS: one per rule. ARGV: 1 rules ('T,tau;…'), 2 clock offset ms.
-- Returns {1} | {2, retry ms, rule}.
return gcra(ARGV[1], 1, ARGV[2]) or {1}
