-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_ready_idx ON execution_steps (run_after, id)
    WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked;
