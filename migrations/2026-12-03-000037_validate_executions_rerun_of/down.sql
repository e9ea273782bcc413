-- A constraint cannot be marked NOT VALID again; re-create it as 000035 left it.
ALTER TABLE executions DROP CONSTRAINT executions_rerun_of_fkey;
ALTER TABLE executions ADD CONSTRAINT executions_rerun_of_fkey
    FOREIGN KEY (rerun_of) REFERENCES executions (id) ON DELETE SET NULL NOT VALID;
