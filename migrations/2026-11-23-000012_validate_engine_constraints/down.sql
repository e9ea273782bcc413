-- A constraint cannot be marked NOT VALID again; re-create both as 000005 left them.
ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_counters_check;
ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_counters_check
    CHECK (upstream_pending >= 0 AND max_retries >= 0) NOT VALID;
ALTER TABLE executions DROP CONSTRAINT executions_parent_execution_id_fkey;
ALTER TABLE executions ADD CONSTRAINT executions_parent_execution_id_fkey
    FOREIGN KEY (parent_execution_id) REFERENCES executions (id) ON DELETE CASCADE NOT VALID;
