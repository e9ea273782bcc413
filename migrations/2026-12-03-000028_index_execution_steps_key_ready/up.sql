-- Admission per concurrency key (000025): a key's ready steps, admitted
-- (throttled = false) and held back (true), in admission order. Only
-- steps with a key are in it.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_key_ready_idx
    ON execution_steps (concurrency_key, throttled, priority DESC, run_after, id)
    WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked AND concurrency_key IS NOT NULL;
