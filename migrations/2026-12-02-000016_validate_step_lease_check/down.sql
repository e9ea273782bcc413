-- A constraint cannot be marked NOT VALID again; re-create it as 000015 left it.
ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_lease_check;
ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_lease_check
    CHECK ((status = 'running') = (locked_until IS NOT NULL)
       AND (status = 'running') = (locked_by IS NOT NULL)) NOT VALID;
COMMENT ON CONSTRAINT execution_steps_lease_check ON execution_steps IS 'A step holds a lease (locked_by and locked_until) exactly while it runs.';
