-- Restores 000034's schema: the transition functions as 000015 left them.
DROP FUNCTION workflow_db_why_execution(uuid);
DROP FUNCTION workflow_db_why_step(uuid);
CREATE OR REPLACE FUNCTION workflow_db_step_transition()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
        -- Every run is a new attempt, whoever starts it: the lease token a
        -- holder must present to report, so a stale holder is refused even
        -- under the same worker id.
        NEW.attempt := OLD.attempt + 1;
    ELSE
        NEW.locked_until := NULL;
        NEW.locked_by := NULL;
        IF NEW.status <> 'pending' THEN
            NEW.completed_at := now();
        END IF;
    END IF;
    RETURN NEW;
END;
$function$;

CREATE OR REPLACE FUNCTION workflow_db_execution_transition()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION workflow_db_executions_transitioned()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    changed_count bigint;
    final_ids uuid[];
    paused_ids uuid[];
    running_ids uuid[];
BEGIN
    -- Old and new rows zipped by id, as in workflow_db_steps_transitioned().
    WITH changed AS MATERIALIZED (
        SELECT c.*
          FROM (SELECT array_agg(id ORDER BY id) AS id,
                       array_agg(status ORDER BY id) AS status,
                       array_agg(error ORDER BY id) AS error
                  FROM new_rows) n,
               (SELECT array_agg(status ORDER BY id) AS status FROM old_rows) o,
               unnest(n.id, n.status, o.status, n.error) AS c(id, status, from_status, error)
         WHERE c.status <> c.from_status),
    events AS (
        INSERT INTO execution_events (execution_id, from_status, to_status, payload)
        SELECT id, from_status, status,
               CASE WHEN error IS NOT NULL THEN jsonb_build_object('error', error) END
          FROM changed
         ORDER BY id),
    notified AS (
        SELECT count(pg_notify('workflow_db_events', json_build_object(
                   'execution_id', x.id, 'step_id', NULL, 'status', x.status)::text)) AS sent
          FROM (SELECT id, status FROM changed ORDER BY id) x)
    SELECT (SELECT count(*) FROM changed),
           (SELECT array_agg(id ORDER BY id) FROM changed WHERE status IN ('completed', 'failed', 'cancelled')),
           (SELECT array_agg(id ORDER BY id) FROM changed WHERE status = 'paused'),
           (SELECT array_agg(id ORDER BY id) FROM changed WHERE status = 'running')
      INTO changed_count, final_ids, paused_ids, running_ids
      FROM notified;
    IF changed_count = 0 THEN
        RETURN NULL;
    END IF;

    -- A final execution runs nothing more.
    IF final_ids IS NOT NULL THEN
        UPDATE execution_steps SET status = 'skipped'
         WHERE execution_id = ANY (final_ids) AND status = 'pending';
    END IF;
    -- A paused one parks its pending steps; a (re)started one unparks them ...
    IF paused_ids IS NOT NULL THEN
        UPDATE execution_steps SET parked = true
         WHERE execution_id = ANY (paused_ids) AND status = 'pending' AND NOT parked;
    END IF;
    IF running_ids IS NOT NULL THEN
        UPDATE execution_steps SET parked = false
         WHERE execution_id = ANY (running_ids) AND status = 'pending' AND parked;
        -- ... and settles: a step failed while it was paused, or nothing is left to run.
        UPDATE executions e
           SET status = CASE WHEN f.failure IS NULL THEN 'completed' ELSE 'failed' END::execution_status,
               error = coalesce(f.failure, e.error)
          FROM (SELECT x.id,
                       (SELECT format('step %s failed: %s', s.node_id, coalesce(s.error, 'no error message'))
                          FROM execution_steps s
                         WHERE s.execution_id = x.id AND s.status = 'failed'
                         ORDER BY s.id LIMIT 1) AS failure
                  FROM unnest(running_ids) AS x(id)) f
         WHERE e.id = f.id AND e.status = 'running'
           AND (f.failure IS NOT NULL
                OR NOT EXISTS (SELECT 1 FROM execution_steps s
                                WHERE s.execution_id = e.id AND s.status IN ('pending', 'running')));
    END IF;
    RETURN NULL;
END;
$function$;

DROP FUNCTION workflow_db_replaying();
ALTER TABLE executions DROP CONSTRAINT executions_rerun_of_fkey;
ALTER TABLE executions DROP COLUMN rerun_of;
COMMENT ON FUNCTION workflow_db_execution_transition() IS 'BEFORE UPDATE OF status trigger on executions: requires READ COMMITTED, refuses illegal transitions (check_violation, constraint executions_status_transition) and sets started_at/completed_at.';
COMMENT ON FUNCTION workflow_db_step_transition() IS 'BEFORE UPDATE OF status trigger on execution_steps: refuses illegal transitions (constraint execution_steps_status_transition) and runs of steps that are not ready (constraint execution_steps_run_when_ready: upstream not done, or execution paused), gives a step moved to running by hand a default 5-minute lease held by the writing role, sets started_at/completed_at, clears the lease when the attempt ends, and numbers each run (attempt + 1: the lease token).';
COMMENT ON FUNCTION workflow_db_executions_transitioned() IS 'AFTER UPDATE statement trigger on executions: appends one event and one NOTIFY per status change, skips the pending steps of final executions, parks (paused) or unparks (running) pending steps, and settles (re)started executions.';
