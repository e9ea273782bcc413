-- When the next step of a queue becomes claimable by time (the earliest
-- run_after of its claimable steps, engine::next_claimable_at): one probe
-- per queue; execution_steps_claimable_idx is ordered by priority first.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_claimable_at_idx
    ON execution_steps (workflow_db_step_queue(queue, node_type), run_after)
    WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked AND NOT throttled;
