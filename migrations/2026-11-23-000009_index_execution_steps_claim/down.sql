DROP INDEX CONCURRENTLY IF EXISTS execution_steps_claim_idx;
