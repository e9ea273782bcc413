-- Running executions by id: "stuck" (db-ops stuck, the studio's overview)
-- reads the running executions in id order, which walked the whole primary
-- key at a million executions (796 ms; 67 ms with this index).
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS executions_running_idx ON executions (id)
    WHERE status = 'running';
