CREATE OR REPLACE FUNCTION workflow_db_step_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    -- (READ COMMITTED is checked once per statement, in workflow_db_steps_transitioned().)
    IF NOT ((OLD.status = 'pending' AND NEW.status IN ('running', 'skipped'))
         OR (OLD.status = 'running' AND NEW.status IN ('completed', 'failed', 'pending'))) THEN
        RAISE EXCEPTION 'illegal step transition % -> %', OLD.status, NEW.status
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_steps_status_transition',
                  TABLE = 'execution_steps',
                  DETAIL = format('%s -> %s', OLD.status, NEW.status);
    END IF;
    IF NEW.status = 'running' THEN
        -- Claims take only ready steps; a hand-written run must not start a
        -- step whose upstream is not done or whose execution is paused. (A
        -- step of an execution not started yet may be run by hand, as plain
        -- SQL job tables do; claims never take it.)
        IF NEW.upstream_pending > 0
           OR (NEW.parked AND EXISTS (SELECT 1 FROM executions
                                       WHERE id = NEW.execution_id AND status = 'paused')) THEN
            RAISE EXCEPTION 'step % of execution % is not runnable: %', NEW.node_id, NEW.execution_id,
                    CASE WHEN NEW.upstream_pending > 0
                         THEN format('%s upstream step(s) not done', NEW.upstream_pending)
                         ELSE 'its execution is paused' END
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'execution_steps_run_when_ready',
                      TABLE = 'execution_steps',
                      DETAIL = format('upstream_pending = %s, parked = %s', NEW.upstream_pending, NEW.parked);
        END IF;
        -- A step moved to running by hand (psql, another service) gets a
        -- default lease held by the writing role, unless the writer sets them.
        NEW.locked_until := coalesce(NEW.locked_until, statement_timestamp() + interval '5 minutes');
        NEW.locked_by := coalesce(NEW.locked_by, session_user);
        NEW.started_at := now();
        NEW.completed_at := NULL;
    ELSE
        NEW.locked_until := NULL;
        NEW.locked_by := NULL;
        IF NEW.status <> 'pending' THEN
            NEW.completed_at := now();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_step_transition() IS 'BEFORE UPDATE OF status trigger on execution_steps: refuses illegal transitions (constraint execution_steps_status_transition) and runs of steps that are not ready (constraint execution_steps_run_when_ready: upstream not done, or execution paused), gives a step moved to running by hand a default 5-minute lease held by the writing role, sets started_at/completed_at, clears the lease when the attempt ends.';

ALTER TABLE execution_steps DROP COLUMN attempt;
