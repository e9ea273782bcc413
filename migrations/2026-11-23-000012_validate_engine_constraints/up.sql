-- Validate the constraints 000005 added NOT VALID. VALIDATE takes only a
-- SHARE UPDATE EXCLUSIVE lock: reads and writes go on while it scans.
ALTER TABLE executions VALIDATE CONSTRAINT executions_parent_execution_id_fkey;
ALTER TABLE execution_steps VALIDATE CONSTRAINT execution_steps_counters_check;
