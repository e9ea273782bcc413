DROP INDEX CONCURRENTLY IF EXISTS execution_steps_wake_idx;
