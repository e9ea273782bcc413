-- A constraint cannot be marked NOT VALID again; re-create it as 000025 left it.
ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_throttle_check;
ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_throttle_check
    CHECK (NOT (throttled AND status = 'running')) NOT VALID;
COMMENT ON CONSTRAINT execution_steps_throttle_check ON execution_steps IS 'A step held back by its concurrency key (throttled) is never running.';
