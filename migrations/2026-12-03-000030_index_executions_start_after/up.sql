-- Delayed starts that are due (000025): pending executions by start_after.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS executions_start_after_idx
    ON executions (start_after)
    WHERE status = 'pending' AND start_after IS NOT NULL;
