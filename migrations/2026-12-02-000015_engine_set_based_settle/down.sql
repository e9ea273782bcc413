-- Restores the row-level triggers and function bodies of 000005/000013/000014.
-- Data written under the new rules (cleared leases, parked flags) stays valid
-- for the old triggers.

ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_lease_check;

DROP TRIGGER executions_transitioned ON executions;
DROP FUNCTION workflow_db_executions_transitioned();
DROP TRIGGER execution_steps_transitioned ON execution_steps;
DROP FUNCTION workflow_db_steps_transitioned();
DROP TRIGGER execution_steps_inserted ON execution_steps;
DROP FUNCTION workflow_db_steps_inserted();
DROP TRIGGER execution_steps_default_lease ON execution_steps;
DROP FUNCTION workflow_db_step_default_lease();
DROP TRIGGER execution_steps_id_immutable ON execution_steps;
DROP TRIGGER executions_id_immutable ON executions;
DROP FUNCTION workflow_db_refuse_id_change();

CREATE FUNCTION workflow_db_settle_execution(p_execution_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    failure text;
BEGIN
    -- The row lock serialises the "last step" race; each statement below
    -- takes a fresh snapshot, so it sees every step committed before the lock.
    PERFORM 1 FROM executions WHERE id = p_execution_id AND status = 'running' FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT format('step %s failed: %s', node_id, coalesce(error, 'no error message')) INTO failure
        FROM execution_steps WHERE execution_id = p_execution_id AND status = 'failed' LIMIT 1;
    IF failure IS NOT NULL THEN
        UPDATE executions SET status = 'failed', error = failure WHERE id = p_execution_id;
    ELSIF NOT EXISTS (SELECT 1 FROM execution_steps
                      WHERE execution_id = p_execution_id AND status IN ('pending', 'running')) THEN
        UPDATE executions SET status = 'completed' WHERE id = p_execution_id;
    END IF;
END;
$$;
COMMENT ON FUNCTION workflow_db_settle_execution(uuid) IS 'Fails a running execution that has a failed step, or completes it when all its steps are final.';

CREATE FUNCTION workflow_db_execution_transitioned() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_events (execution_id, from_status, to_status, payload)
    VALUES (NEW.id, OLD.status, NEW.status,
            CASE WHEN NEW.error IS NOT NULL THEN jsonb_build_object('error', NEW.error) END);
    PERFORM pg_notify('workflow_db_events', json_build_object(
        'execution_id', NEW.id, 'step_id', NULL, 'status', NEW.status)::text);
    IF NEW.status IN ('completed', 'failed', 'cancelled') THEN
        -- A final execution runs nothing more (none are left when it completed by itself).
        UPDATE execution_steps SET status = 'skipped'
            WHERE execution_id = NEW.id AND status = 'pending';
    ELSIF NEW.status = 'running' THEN
        PERFORM workflow_db_settle_execution(NEW.id);
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION workflow_db_execution_transitioned() IS 'AFTER UPDATE OF status trigger on executions: appends the event, notifies, skips the pending steps of a final execution, settles a (re)started one.';
CREATE TRIGGER executions_status_transitioned AFTER UPDATE OF status ON executions
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION workflow_db_execution_transitioned();

CREATE FUNCTION workflow_db_step_transitioned() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    exec_status execution_status;
BEGIN
    INSERT INTO execution_events (execution_id, step_id, from_status, to_status, payload)
    VALUES (NEW.execution_id, NEW.id, OLD.status, NEW.status, jsonb_strip_nulls(jsonb_build_object(
        'node_id', NEW.node_id,
        'retry_count', NEW.retry_count,
        'worker', NEW.locked_by,
        'error', CASE WHEN NEW.status IN ('failed', 'pending') THEN NEW.error END)));
    PERFORM pg_notify('workflow_db_events', json_build_object(
        'execution_id', NEW.execution_id, 'step_id', NEW.id, 'status', NEW.status)::text);
    IF NEW.status = 'pending' THEN
        -- A retry (or reclaimed lease) under a final execution would never be
        -- claimed: skip it. FOR SHARE waits for a concurrent cancel to commit
        -- (and a later cancel waits for us, then sees this step pending).
        SELECT status INTO exec_status FROM executions WHERE id = NEW.execution_id FOR SHARE;
        IF exec_status IN ('completed', 'failed', 'cancelled') THEN
            UPDATE execution_steps SET status = 'skipped' WHERE id = NEW.id AND status = 'pending';
        END IF;
    ELSIF NEW.status = 'failed' THEN
        PERFORM workflow_db_settle_execution(NEW.execution_id);
    ELSIF NEW.status IN ('completed', 'skipped') THEN
        IF cardinality(NEW.downstream) > 0 THEN
            UPDATE execution_steps SET upstream_pending = upstream_pending - 1
                WHERE execution_id = NEW.execution_id AND node_id = ANY (NEW.downstream)
                  AND status = 'pending';
        END IF;
        -- Fast path: an unfinished step nobody is writing means this was not
        -- the last one. Rows locked by concurrent writers are skipped, and
        -- then the slow path decides under the execution's row lock.
        PERFORM 1 FROM execution_steps
            WHERE execution_id = NEW.execution_id AND status IN ('pending', 'running')
            LIMIT 1 FOR SHARE SKIP LOCKED;
        IF NOT FOUND THEN
            PERFORM workflow_db_settle_execution(NEW.execution_id);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION workflow_db_step_transitioned() IS 'AFTER UPDATE OF status trigger on execution_steps: appends the event, notifies, skips a step sent back to pending under a final execution, unblocks downstream steps and settles the execution.';
CREATE TRIGGER execution_steps_status_transitioned AFTER UPDATE OF status ON execution_steps
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION workflow_db_step_transitioned();

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

ALTER TABLE execution_steps DROP COLUMN parked;
COMMENT ON COLUMN execution_steps.locked_by IS 'Worker holding (or last holding) the lease on the running step.';
COMMENT ON COLUMN execution_steps.locked_until IS 'When the running step''s lease expires (then it is reclaimable); NULL whenever the step is not running (cleared by the transition trigger).';
