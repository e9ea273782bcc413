-- Running steps per concurrency key (000025), counted when a key is rebalanced.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_key_running_idx
    ON execution_steps (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;
