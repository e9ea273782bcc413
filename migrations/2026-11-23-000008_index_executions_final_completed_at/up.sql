-- Serves prune: final executions by completion time.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS executions_final_completed_at_idx ON executions (completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
