-- "Does this execution still have unfinished steps?"
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_unfinished_idx ON execution_steps (execution_id)
    WHERE status IN ('pending', 'running');
