-- Validate the foreign key 000035 added NOT VALID (every existing row has
-- rerun_of NULL). VALIDATE takes only a SHARE UPDATE EXCLUSIVE lock on
-- executions: reads and writes go on while it scans.
ALTER TABLE executions VALIDATE CONSTRAINT executions_rerun_of_fkey;
