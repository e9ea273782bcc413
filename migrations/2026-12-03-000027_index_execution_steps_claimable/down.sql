DROP INDEX CONCURRENTLY IF EXISTS execution_steps_claimable_idx;
