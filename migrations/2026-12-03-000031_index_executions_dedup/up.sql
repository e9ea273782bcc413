-- Deduplication lookups (000025): a workflow's executions by dedup key, newest first.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS executions_dedup_idx
    ON executions (workflow_id, dedup_key, created_at DESC)
    WHERE dedup_key IS NOT NULL;
