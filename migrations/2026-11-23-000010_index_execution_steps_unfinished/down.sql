DROP INDEX CONCURRENTLY IF EXISTS execution_steps_unfinished_idx;
