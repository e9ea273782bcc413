DROP INDEX CONCURRENTLY IF EXISTS execution_steps_ready_type_idx;
