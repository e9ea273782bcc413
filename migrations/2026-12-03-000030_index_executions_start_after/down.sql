DROP INDEX CONCURRENTLY IF EXISTS executions_start_after_idx;
