-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_ready_type_idx ON execution_steps (node_type, run_after, id)
    WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked;
