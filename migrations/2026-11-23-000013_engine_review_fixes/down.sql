-- Restores the function bodies and comments of 000005.

CREATE OR REPLACE FUNCTION workflow_db_execution_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    IF NOT ((OLD.status = 'pending' AND NEW.status IN ('running', 'cancelled'))
         OR (OLD.status = 'running' AND NEW.status IN ('paused', 'completed', 'failed', 'cancelled'))
         OR (OLD.status = 'paused' AND NEW.status IN ('running', 'cancelled'))) THEN
        RAISE EXCEPTION 'illegal execution transition % -> %', OLD.status, NEW.status
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'executions_status_transition',
                  TABLE = 'executions',
                  DETAIL = format('%s -> %s', OLD.status, NEW.status);
    END IF;
    IF OLD.status = 'pending' AND NEW.status = 'running' THEN
        NEW.started_at := now();
    ELSIF NEW.status IN ('completed', 'failed', 'cancelled') THEN
        NEW.completed_at := now();
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_execution_transition() IS 'BEFORE UPDATE OF status trigger on executions: refuses illegal transitions (check_violation, constraint executions_status_transition) and sets started_at/completed_at.';

CREATE OR REPLACE FUNCTION workflow_db_step_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    IF NOT ((OLD.status = 'pending' AND NEW.status IN ('running', 'skipped'))
         OR (OLD.status = 'running' AND NEW.status IN ('completed', 'failed', 'pending'))) THEN
        RAISE EXCEPTION 'illegal step transition % -> %', OLD.status, NEW.status
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_steps_status_transition',
                  TABLE = 'execution_steps',
                  DETAIL = format('%s -> %s', OLD.status, NEW.status);
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
COMMENT ON FUNCTION workflow_db_step_transition() IS 'BEFORE UPDATE OF status trigger on execution_steps: refuses illegal transitions (check_violation, constraint execution_steps_status_transition), sets started_at/completed_at, drops the lease when the attempt ends.';

CREATE OR REPLACE FUNCTION workflow_db_step_transitioned() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_events (execution_id, step_id, from_status, to_status, payload)
    VALUES (NEW.execution_id, NEW.id, OLD.status, NEW.status, jsonb_strip_nulls(jsonb_build_object(
        'node_id', NEW.node_id,
        'retry_count', NEW.retry_count,
        'worker', NEW.locked_by,
        'error', CASE WHEN NEW.status IN ('failed', 'pending') THEN NEW.error END)));
    PERFORM pg_notify('workflow_db_events', json_build_object(
        'execution_id', NEW.execution_id, 'step_id', NEW.id, 'status', NEW.status)::text);
    IF NEW.status = 'failed' THEN
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
COMMENT ON FUNCTION workflow_db_step_transitioned() IS 'AFTER UPDATE OF status trigger on execution_steps: appends the event, notifies, unblocks downstream steps and settles the execution.';

DROP FUNCTION workflow_db_require_read_committed();
