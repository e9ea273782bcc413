-- Engine API: versioned definitions, idempotent and nested executions, a
-- state machine enforced by PostgreSQL itself (whoever writes), leases and
-- dependency counters for claiming, an append-only event history and NOTIFY.
-- The indexes on the existing tables follow in migrations 000006-000011 (built
-- CONCURRENTLY, outside a transaction) and the constraints added NOT VALID here
-- are validated in 000012, so no step holds a write-blocking lock for long.

-------------------------------------------------------------------------------
-- Workflows: optimistic concurrency.
ALTER TABLE workflows ADD COLUMN version integer NOT NULL DEFAULT 1;
COMMENT ON COLUMN workflows.version IS 'Version of the definition, starting at 1; bumped by a trigger whenever name, description, nodes or edges change (optimistic concurrency).';

CREATE FUNCTION workflow_db_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version = OLD.version
       AND (NEW.name, NEW.description, NEW.nodes, NEW.edges)
           IS DISTINCT FROM (OLD.name, OLD.description, OLD.nodes, OLD.edges) THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_bump_version() IS 'BEFORE UPDATE trigger on workflows: version + 1 when the definition changes.';
CREATE TRIGGER workflows_bump_version BEFORE UPDATE ON workflows
    FOR EACH ROW EXECUTE FUNCTION workflow_db_bump_version();

-------------------------------------------------------------------------------
-- Executions: version, idempotency, sub-workflows.
ALTER TABLE executions ADD COLUMN workflow_version integer NOT NULL DEFAULT 1;
ALTER TABLE executions ADD COLUMN idempotency_key text;
ALTER TABLE executions ADD COLUMN parent_execution_id uuid;
ALTER TABLE executions ADD CONSTRAINT executions_parent_execution_id_fkey
    FOREIGN KEY (parent_execution_id) REFERENCES executions (id) ON DELETE CASCADE NOT VALID;
COMMENT ON COLUMN executions.workflow_version IS 'The workflows.version this execution was started from.';
COMMENT ON COLUMN executions.idempotency_key IS 'Optional caller key, unique per workflow: a repeated start with the same key returns this execution.';
COMMENT ON COLUMN executions.parent_execution_id IS 'The execution that started this one as a sub-workflow; deleting the parent deletes its children.';

-------------------------------------------------------------------------------
-- Steps: dependencies, retries, leases.
ALTER TABLE execution_steps ADD COLUMN upstream_pending integer NOT NULL DEFAULT 0;
ALTER TABLE execution_steps ADD COLUMN downstream text[] NOT NULL DEFAULT '{}';
ALTER TABLE execution_steps ADD COLUMN max_retries integer NOT NULL DEFAULT 0;
ALTER TABLE execution_steps ADD COLUMN run_after timestamptz NOT NULL DEFAULT now();
ALTER TABLE execution_steps ADD COLUMN locked_by text;
ALTER TABLE execution_steps ADD COLUMN locked_until timestamptz;
ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_counters_check
    CHECK (upstream_pending >= 0 AND max_retries >= 0) NOT VALID;
COMMENT ON COLUMN execution_steps.upstream_pending IS 'Upstream steps (per the workflow edges) not yet completed or skipped; the step is runnable at 0. Decremented by a trigger.';
COMMENT ON COLUMN execution_steps.downstream IS 'Node ids of the steps that depend on this one (per the workflow edges), fixed at start.';
COMMENT ON COLUMN execution_steps.max_retries IS 'How many retries a failure (or an expired lease) may schedule before the step fails for good.';
COMMENT ON COLUMN execution_steps.run_after IS 'Earliest time the step may be claimed (now at start; now + backoff after a failure).';
COMMENT ON COLUMN execution_steps.locked_by IS 'Worker holding (or last holding) the lease on the running step.';
COMMENT ON COLUMN execution_steps.locked_until IS 'When the running step''s lease expires (then it is reclaimable); NULL whenever the step is not running (cleared by the transition trigger).';


-------------------------------------------------------------------------------
-- History.
CREATE TABLE execution_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id uuid        NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step_id      uuid        REFERENCES execution_steps (id) ON DELETE CASCADE,
    from_status  text,
    to_status    text        NOT NULL,
    payload      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX execution_events_execution_id_idx ON execution_events (execution_id, id);
CREATE INDEX execution_events_step_id_idx ON execution_events (step_id, id) WHERE step_id IS NOT NULL;
COMMENT ON TABLE execution_events IS 'Append-only history: one row per status transition of an execution or a step, written by triggers in the same transaction.';
COMMENT ON COLUMN execution_events.id IS 'Primary key; increases with insertion order.';
COMMENT ON COLUMN execution_events.execution_id IS 'The execution concerned; deleting it deletes its history.';
COMMENT ON COLUMN execution_events.step_id IS 'The step concerned, NULL for a transition of the execution itself.';
COMMENT ON COLUMN execution_events.from_status IS 'Status before the transition.';
COMMENT ON COLUMN execution_events.to_status IS 'Status after the transition.';
COMMENT ON COLUMN execution_events.payload IS 'Details of the transition: node id, worker, retry count, error.';
COMMENT ON COLUMN execution_events.created_at IS 'When the transition happened (transaction time).';

CREATE FUNCTION workflow_db_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Deletes cascading from executions/steps run inside the RI trigger (depth > 1).
    IF TG_OP = 'DELETE' AND pg_trigger_depth() > 1 THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'execution_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege', TABLE = 'execution_events';
END;
$$;
COMMENT ON FUNCTION workflow_db_events_append_only() IS 'BEFORE UPDATE/DELETE trigger on execution_events: refuses both, except deletes cascading from an execution or step.';
CREATE TRIGGER execution_events_append_only BEFORE UPDATE OR DELETE ON execution_events
    FOR EACH ROW EXECUTE FUNCTION workflow_db_events_append_only();

-------------------------------------------------------------------------------
-- Settling an execution: fail it if a step failed, complete it when every step is final.
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

-------------------------------------------------------------------------------
-- Execution state machine.
CREATE FUNCTION workflow_db_execution_transition() RETURNS trigger
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
CREATE TRIGGER executions_status_transition BEFORE UPDATE OF status ON executions
    FOR EACH ROW EXECUTE FUNCTION workflow_db_execution_transition();

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

-------------------------------------------------------------------------------
-- Step state machine.
CREATE FUNCTION workflow_db_step_transition() RETURNS trigger
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
CREATE TRIGGER execution_steps_status_transition BEFORE UPDATE OF status ON execution_steps
    FOR EACH ROW EXECUTE FUNCTION workflow_db_step_transition();

CREATE FUNCTION workflow_db_step_transitioned() RETURNS trigger
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
CREATE TRIGGER execution_steps_status_transitioned AFTER UPDATE OF status ON execution_steps
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION workflow_db_step_transitioned();
