DROP INDEX CONCURRENTLY IF EXISTS execution_steps_ready_idx;
