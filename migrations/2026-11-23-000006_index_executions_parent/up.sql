-- Serves the sub-workflow foreign key and the ancestors/descendants queries.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS executions_parent_execution_id_idx ON executions (parent_execution_id)
    WHERE parent_execution_id IS NOT NULL;
