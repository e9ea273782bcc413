-- The due waits (engine::fire_due_waits): ready timer and signal steps of
-- running executions by wake_at. Small: only waiting timers and signals.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_wake_idx ON execution_steps (wake_at)
    WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked AND wake_at IS NOT NULL;
