DROP INDEX CONCURRENTLY IF EXISTS executions_running_idx;
