-- The claim uses execution_steps_ready_idx (000017) now.
DROP INDEX CONCURRENTLY IF EXISTS execution_steps_claim_idx;
