DROP INDEX CONCURRENTLY IF EXISTS execution_steps_claimable_at_idx;
