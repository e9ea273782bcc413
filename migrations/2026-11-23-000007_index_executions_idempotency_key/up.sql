-- An idempotency key is unique per workflow: a racing second start conflicts here.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS executions_workflow_id_idempotency_key_key
    ON executions (workflow_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
