DROP INDEX CONCURRENTLY IF EXISTS executions_rerun_of_idx;
