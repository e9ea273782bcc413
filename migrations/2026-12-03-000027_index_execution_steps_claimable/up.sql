-- The claim order per queue (000025), over the steps a claim may take:
-- pending, upstream done, execution running, not throttled by its key. A
-- claim reads, per queue it serves, that queue's steps highest priority
-- first, then oldest run_after; throttled steps and paused executions'
-- steps are not in it, so a claim never scans past them.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_claimable_idx
    ON execution_steps (workflow_db_step_queue(queue, node_type), priority DESC, run_after, id)
    WHERE status = 'pending' AND upstream_pending = 0 AND NOT parked AND NOT throttled;
