-- A crash is not the step's failure: a step whose lease expired (its worker
-- died, hung, or lost the database) goes back to pending without spending a
-- retry, and this counter says how often that happened. A step that keeps
-- killing its workers (a poison message, an out-of-memory input) fails for
-- good once it was reclaimed more often than the caller allows
-- (engine::ReclaimPolicy), so it cannot loop for ever.
ALTER TABLE execution_steps ADD COLUMN reclaims integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN execution_steps.reclaims IS 'How many times a run of this step ended because its lease expired and it was reclaimed (engine::reclaim_expired). Does not count against max_retries unless the reclaim policy says so.';
