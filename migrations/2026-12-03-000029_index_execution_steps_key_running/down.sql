DROP INDEX CONCURRENTLY IF EXISTS execution_steps_key_running_idx;
