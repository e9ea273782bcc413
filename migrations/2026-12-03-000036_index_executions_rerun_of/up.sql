-- The re-runs of an execution (000035), and the ON DELETE SET NULL of its deletion.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS executions_rerun_of_idx ON executions (rerun_of)
    WHERE rerun_of IS NOT NULL;
