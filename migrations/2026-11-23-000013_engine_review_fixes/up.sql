-- Review fixes to the engine's state machine (000005), as new function bodies:
-- * a step moves to running only with a lease (claiming is the only way to
--   run a step; a lease-less running step could never be finished or reclaimed);
-- * a step that goes back to pending (retry, reclaimed lease) under a final
--   execution is skipped at once instead of waiting for ever;
-- * transitions refuse to run outside READ COMMITTED: settling relies on each
--   statement taking a fresh snapshot, which REPEATABLE READ and SERIALIZABLE
--   do not, so two concurrent "last step" completers could both miss each other.

CREATE OR REPLACE FUNCTION workflow_db_require_read_committed() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'workflow-db engine transitions require READ COMMITTED (this transaction is %)',
                current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Run status changes of executions and steps in a READ COMMITTED transaction (the PostgreSQL default).';
    END IF;
END;
$$;
COMMENT ON FUNCTION workflow_db_require_read_committed() IS 'Raises feature_not_supported unless the transaction is READ COMMITTED: settling an execution relies on a fresh snapshot per statement.';

CREATE OR REPLACE FUNCTION workflow_db_execution_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    PERFORM workflow_db_require_read_committed();
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
COMMENT ON FUNCTION workflow_db_execution_transition() IS 'BEFORE UPDATE OF status trigger on executions: requires READ COMMITTED, refuses illegal transitions (check_violation, constraint executions_status_transition) and sets started_at/completed_at.';

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

CREATE OR REPLACE FUNCTION workflow_db_step_transitioned() RETURNS trigger
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
