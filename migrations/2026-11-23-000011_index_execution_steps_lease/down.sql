DROP INDEX CONCURRENTLY IF EXISTS execution_steps_lease_idx;
