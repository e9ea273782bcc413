-- Claims by queue use execution_steps_claimable_idx (000027) now.
DROP INDEX CONCURRENTLY IF EXISTS execution_steps_ready_type_idx;
