-- Expired leases.
-- Built CONCURRENTLY: writes to the table go on while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS execution_steps_lease_idx ON execution_steps (locked_until)
    WHERE status = 'running';
