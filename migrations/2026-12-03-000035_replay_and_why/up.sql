-- Replay, re-run and "why is it not running?" (issue 12).
--
-- Replay: a failed or cancelled execution runs again from where it
-- stopped: its failed and skipped steps go back to pending (retry count
-- reset, dependency counters recomputed), completed steps keep their
-- outputs, and the execution returns to running. These transitions
-- (execution failed|cancelled -> running, step failed|skipped -> pending)
-- are refused unless workflow_db.replay holds the current transaction's id
-- (engine::replay_execution sets it with set_config(.., true), so neither
-- a session-level SET nor a later transaction can turn the guard off); the history
-- records them like any other. Re-run: a new execution of the same
-- workflow and input, linked to the old one by rerun_of.
--
-- workflow_db_why_step / workflow_db_why_execution: what a step (or each
-- unfinished step of an execution) waits for, one row per reason, for psql
-- users and the crate alike (engine::why_not_running).

ALTER TABLE executions ADD COLUMN rerun_of uuid;
COMMENT ON COLUMN executions.rerun_of IS 'The execution this one re-runs from scratch (engine::rerun_execution); NULL once that one is deleted.';
ALTER TABLE executions ADD CONSTRAINT executions_rerun_of_fkey
    FOREIGN KEY (rerun_of) REFERENCES executions (id) ON DELETE SET NULL NOT VALID;

CREATE FUNCTION workflow_db_replaying() RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(current_setting('workflow_db.replay', true), '') = txid_current()::text
$$;
COMMENT ON FUNCTION workflow_db_replaying() IS 'Whether this transaction replays an execution (workflow_db.replay holds its transaction id): only then may a final execution run again and a failed or skipped step return to pending.';

CREATE OR REPLACE FUNCTION workflow_db_execution_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    PERFORM workflow_db_require_read_committed();
    IF NOT ((OLD.status = 'pending' AND NEW.status IN ('running', 'cancelled'))
         OR (OLD.status = 'running' AND NEW.status IN ('paused', 'completed', 'failed', 'cancelled'))
         OR (OLD.status = 'paused' AND NEW.status IN ('running', 'cancelled'))
         OR (OLD.status IN ('failed', 'cancelled') AND NEW.status = 'running' AND workflow_db_replaying())) THEN
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
    ELSIF OLD.status IN ('failed', 'cancelled') THEN
        -- Replayed: running again, no longer finished or failed.
        NEW.completed_at := NULL;
        NEW.error := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION workflow_db_step_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    -- (READ COMMITTED is checked once per statement, in workflow_db_steps_transitioned().)
    IF NOT ((OLD.status = 'pending' AND NEW.status IN ('running', 'skipped'))
         OR (OLD.status = 'running' AND NEW.status IN ('completed', 'failed', 'pending'))
         OR (OLD.status IN ('failed', 'skipped') AND NEW.status = 'pending' AND workflow_db_replaying())) THEN
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
            -- A finished step holds back nothing: a replay or a removed
            -- limit must not find it throttled.
            NEW.throttled := false;
        ELSIF OLD.status IN ('failed', 'skipped') THEN
            -- Replayed: a fresh retry budget, nothing finished.
            NEW.completed_at := NULL;
            NEW.retry_count := 0;
            NEW.error := NULL;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

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
        -- ... and settles: a step failed while it was paused, or nothing is
        -- left to run (not while replaying: the replay resets the failed and
        -- skipped steps next, in the same transaction).
        UPDATE executions e
           SET status = CASE WHEN f.failure IS NULL THEN 'completed' ELSE 'failed' END::execution_status,
               error = coalesce(f.failure, e.error)
          FROM (SELECT x.id,
                       (SELECT format('step %s failed: %s', s.node_id, coalesce(s.error, 'no error message'))
                          FROM execution_steps s
                         WHERE s.execution_id = x.id AND s.status = 'failed'
                         ORDER BY s.id LIMIT 1) AS failure
                  FROM unnest(running_ids) AS x(id)) f
         WHERE e.id = f.id AND e.status = 'running' AND NOT workflow_db_replaying()
           AND (f.failure IS NOT NULL
                OR NOT EXISTS (SELECT 1 FROM execution_steps s
                                WHERE s.execution_id = e.id AND s.status IN ('pending', 'running')));
    END IF;
    RETURN NULL;
END;
$function$;

-- What a step waits for: one row per reason, in the order they apply.
-- Codes: not_found, finished, running, execution_final, delayed_start,
-- execution_pending, execution_paused, upstream, retry_backoff, scheduled,
-- concurrency_key, queue_paused, queue_full, claimable.
CREATE FUNCTION workflow_db_why_step(step uuid) RETURNS TABLE (reason text, detail text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s execution_steps;
    e executions;
    q queues;
    lim concurrency_limits;
    queue_name text;
    running_n bigint;
    admitted_n bigint;
    waiting boolean := false;
BEGIN
    SELECT * INTO s FROM execution_steps x WHERE x.id = step;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', format('no step %s', step);
        RETURN;
    END IF;
    IF s.status IN ('completed', 'failed', 'skipped') THEN
        RETURN QUERY SELECT 'finished', format('step %s is %s', s.node_id, s.status);
        RETURN;
    END IF;
    IF s.status = 'running' THEN
        RETURN QUERY SELECT 'running', format('step %s runs as attempt %s, leased to %s until %s',
                                               s.node_id, s.attempt, s.locked_by, s.locked_until);
        RETURN;
    END IF;
    SELECT * INTO e FROM executions x WHERE x.id = s.execution_id;
    IF e.status IN ('completed', 'failed', 'cancelled') THEN
        RETURN QUERY SELECT 'execution_final', format('its execution is %s', e.status);
        RETURN;
    ELSIF e.status = 'pending' AND e.start_after > now() THEN
        RETURN QUERY SELECT 'delayed_start', format('its execution starts at %s', e.start_after);
        waiting := true;
    ELSIF e.status = 'pending' THEN
        RETURN QUERY SELECT 'execution_pending',
            CASE WHEN e.start_after IS NULL THEN 'its execution was not started'
                 ELSE format('its execution was due at %s and is started by the maintenance loop (start_due_executions)', e.start_after) END;
        waiting := true;
    ELSIF e.status = 'paused' THEN
        RETURN QUERY SELECT 'execution_paused', 'its execution is paused';
        waiting := true;
    END IF;
    IF s.upstream_pending > 0 THEN
        RETURN QUERY SELECT 'upstream', format('%s upstream step(s) not done: %s', s.upstream_pending,
            (SELECT string_agg(format('%s (%s)', u.node_id, u.status), ', ' ORDER BY u.node_id)
               FROM execution_steps u
              WHERE u.execution_id = s.execution_id AND s.node_id = ANY (u.downstream)
                AND u.status NOT IN ('completed', 'skipped')));
        waiting := true;
    END IF;
    IF s.run_after > now() THEN
        IF s.retry_count > 0 THEN
            RETURN QUERY SELECT 'retry_backoff', format('retry %s of %s waits until %s (last error: %s)',
                                                        s.retry_count, s.max_retries, s.run_after,
                                                        coalesce(s.error, 'none'));
        ELSE
            RETURN QUERY SELECT 'scheduled', format('not claimable before %s', s.run_after);
        END IF;
        waiting := true;
    END IF;
    IF s.throttled THEN
        SELECT * INTO lim FROM concurrency_limits c WHERE c.key = s.concurrency_key;
        SELECT count(*) INTO running_n FROM execution_steps r
         WHERE r.concurrency_key = s.concurrency_key AND r.status = 'running';
        SELECT count(*) INTO admitted_n FROM execution_steps a
         WHERE a.concurrency_key = s.concurrency_key AND a.status = 'pending' AND a.upstream_pending = 0
           AND NOT a.parked AND NOT a.throttled;
        RETURN QUERY SELECT 'concurrency_key',
            format('concurrency key %s is at its limit: %s running and %s admitted of %s', s.concurrency_key,
                   running_n, admitted_n, coalesce(lim.max_running::text, 'no limit (rebalance_concurrency_keys releases it)'));
        waiting := true;
    END IF;
    queue_name := workflow_db_step_queue(s.queue, s.node_type);
    SELECT * INTO q FROM queues u WHERE u.name = queue_name;
    IF FOUND AND q.paused THEN
        RETURN QUERY SELECT 'queue_paused', format('queue %s is paused', queue_name);
        waiting := true;
    ELSIF FOUND AND q.running >= q.max_running THEN
        RETURN QUERY SELECT 'queue_full', format('queue %s is at its limit: %s running of %s',
                                                  queue_name, q.running, q.max_running);
        waiting := true;
    END IF;
    IF NOT waiting THEN
        RETURN QUERY SELECT 'claimable', format('claimable now by a worker of queue %s (priority %s)',
                                                 queue_name, s.priority);
    END IF;
END;
$$;
COMMENT ON FUNCTION workflow_db_why_step(uuid) IS 'What a step waits for, one row per reason (reason code, detail): its execution (final, delayed, not started, paused), upstream steps, a retry backoff or run_after, its concurrency key, its queue (paused, full); ''claimable'' when nothing holds it back, ''running''/''finished'' otherwise.';

-- The same for an execution: its own state, then each unfinished step's reasons.
CREATE FUNCTION workflow_db_why_execution(execution uuid)
    RETURNS TABLE (step_id uuid, node_id text, reason text, detail text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    e executions;
BEGIN
    SELECT * INTO e FROM executions x WHERE x.id = execution;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::uuid, NULL::text, 'not_found', format('no execution %s', execution);
        RETURN;
    END IF;
    IF e.status IN ('completed', 'failed', 'cancelled') THEN
        RETURN QUERY SELECT NULL::uuid, NULL::text, 'finished',
            format('the execution is %s%s', e.status, coalesce(': ' || e.error, ''));
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM execution_steps s WHERE s.execution_id = execution
                                                     AND s.status IN ('pending', 'running')) THEN
        RETURN QUERY SELECT NULL::uuid, NULL::text, 'no_runnable_step',
            format('the execution is %s with no pending or running step', e.status);
        RETURN;
    END IF;
    RETURN QUERY
        SELECT s.id, s.node_id, w.reason, w.detail
          FROM execution_steps s CROSS JOIN LATERAL workflow_db_why_step(s.id) w
         WHERE s.execution_id = execution AND s.status IN ('pending', 'running')
         ORDER BY s.id, w.reason;
END;
$$;
COMMENT ON FUNCTION workflow_db_why_execution(uuid) IS 'What an execution waits for: ''finished'' or ''no_runnable_step'' for the execution itself, else each pending or running step''s reasons (workflow_db_why_step).';
COMMENT ON FUNCTION workflow_db_execution_transition() IS 'BEFORE UPDATE OF status trigger on executions: requires READ COMMITTED, refuses illegal transitions (check_violation, constraint executions_status_transition; failed|cancelled -> running only while replaying) and sets started_at/completed_at (cleared, with error, on a replay).';
COMMENT ON FUNCTION workflow_db_step_transition() IS 'BEFORE UPDATE OF status trigger on execution_steps: refuses illegal transitions (constraint execution_steps_status_transition; failed|skipped -> pending only while replaying) and runs of steps that are not ready (constraint execution_steps_run_when_ready: upstream not done, or execution paused), gives a step moved to running by hand a default 5-minute lease held by the writing role, sets started_at/completed_at, clears the lease when the attempt ends, numbers each run (attempt + 1: the lease token), and resets the retry budget of a replayed step.';
COMMENT ON FUNCTION workflow_db_executions_transitioned() IS 'AFTER UPDATE statement trigger on executions: appends one event and one NOTIFY per status change, skips the pending steps of final executions, parks (paused) or unparks (running) pending steps, and settles (re)started executions (not while replaying).';
