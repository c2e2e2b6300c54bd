-- GUESSES: a guessing cap's rules (lua/gcra.lua is put in front): peeks whether one more
-- wrong code would be allowed, or spends one of every rule (or none).
-- KEYS: one per rule. ARGV: 1 rules ('T,tau;…'), 2 clock offset ms, 3 'peek' or 'spend'.
-- Returns {1} | {2, retry ms, rule}.
return gcra(ARGV[1], 1, ARGV[2], ARGV[3] == 'peek') or {1}
