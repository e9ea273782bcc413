-- A hand-written pending -> running (without locked_until) no longer fails:
-- it gets a default lease, so tools that claim with plain SQL keep working and
-- the step cannot be stranded without a lease (it is reclaimed when it expires).
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
        -- A step moved to running by hand (psql, another service) gets a
        -- default lease, held by the writing role: it can be finished like any
        -- running step, and reclaimed if nobody finishes it.
        NEW.locked_until := now() + interval '5 minutes';
        NEW.locked_by := coalesce(NEW.locked_by, session_user);
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
COMMENT ON FUNCTION workflow_db_step_transition() IS 'BEFORE UPDATE OF status trigger on execution_steps: requires READ COMMITTED, refuses illegal transitions (check_violation, constraint execution_steps_status_transition) gives a step moved to running without a lease a default 5-minute lease held by the writing role, sets started_at/completed_at, drops the lease when the attempt ends.';
