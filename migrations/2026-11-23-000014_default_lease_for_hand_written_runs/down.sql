-- Back to 000013: a move to running without a lease is refused.
CREATE OR REPLACE FUNCTION workflow_db_step_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    PERFORM workflow_db_require_read_committed();
    IF NOT ((OLD.status = 'pending' AND NEW.status IN ('running', 'skipped'))
         OR (OLD.status = 'running' AND NEW.status IN ('completed', 'failed', 'pending'))) THEN
        RAISE EXCEPTION 'illegal step transition % -> %', OLD.status, NEW.status
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_steps_status_transition',
                  TABLE = 'execution_steps',
                  DETAIL = format('%s -> %s', OLD.status, NEW.status);
    END IF;
    IF NEW.status = 'running' AND NEW.locked_until IS NULL THEN
        RAISE EXCEPTION 'a step runs only under a lease: set locked_by and locked_until (claim it)'
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_steps_running_lease',
                  TABLE = 'execution_steps',
                  DETAIL = 'pending -> running without locked_until';
    END IF;
    IF NEW.status = 'running' THEN
        NEW.started_at := now();
        NEW.completed_at := NULL;
    ELSIF NEW.status = 'pending' THEN
        NEW.locked_until := NULL;
    ELSE
        NEW.completed_at := now();
        NEW.locked_until := NULL;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_step_transition() IS 'BEFORE UPDATE OF status trigger on execution_steps: requires READ COMMITTED, refuses illegal transitions (check_violation, constraint execution_steps_status_transition) and a move to running without a lease (constraint execution_steps_running_lease), sets started_at/completed_at, drops the lease when the attempt ends.';
