-- Status enums shared by executions and steps, and the trigger function that
-- keeps every table's updated_at honest whoever writes the row (this crate,
-- another service, or psql).
CREATE TYPE execution_status AS ENUM ('pending', 'running', 'paused', 'completed', 'failed', 'cancelled');
COMMENT ON TYPE execution_status IS 'Lifecycle of a workflow execution; completed, failed and cancelled are final.';

CREATE TYPE step_status AS ENUM ('pending', 'running', 'completed', 'failed', 'skipped');
COMMENT ON TYPE step_status IS 'Lifecycle of one node run inside an execution; completed, failed and skipped are final.';

CREATE FUNCTION workflow_db_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Respect an explicit updated_at written by the statement; otherwise stamp now().
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_set_updated_at() IS 'BEFORE UPDATE trigger: sets updated_at = now() unless the UPDATE set it explicitly.';
