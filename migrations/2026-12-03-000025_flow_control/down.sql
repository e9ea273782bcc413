-- Restores 000024's schema: the functions as 000015/000022 defined them.
DROP TRIGGER executions_inserted_start_after ON executions;
DROP TRIGGER executions_start_after ON executions;
DROP TRIGGER execution_steps_deleted ON execution_steps;
DROP FUNCTION workflow_db_steps_deleted();
DROP FUNCTION workflow_db_execution_start_after();
DROP TRIGGER executions_dedup ON executions;
DROP FUNCTION workflow_db_execution_dedup();
DROP FUNCTION workflow_db_find_duplicate(uuid, text);
DROP TABLE concurrency_limits;
DROP FUNCTION workflow_db_concurrency_limit_inserted();
DROP FUNCTION workflow_db_concurrency_limit_changed();
DROP FUNCTION workflow_db_rebalance_keys(text[], uuid[], text[]);
DROP FUNCTION workflow_db_count_queue_running(text[], integer[]);
DROP TABLE queues;
DROP FUNCTION workflow_db_queue_count_running();
DROP FUNCTION workflow_db_notify_claimable(text[], timestamptz[]);
CREATE OR REPLACE FUNCTION workflow_db_notify_claimable(node_types text[], run_afters timestamp with time zone[])
 RETURNS bigint
 LANGUAGE sql
AS $function$
    SELECT count(pg_notify('workflow_db_claimable', json_build_object(
               'node_type', g.node_type, 'steps', g.steps, 'run_after', g.run_after)::text))
      FROM (SELECT t.node_type, count(*) AS steps, min(t.run_after) AS run_after
              FROM unnest(node_types, run_afters) AS t(node_type, run_after)
             GROUP BY t.node_type
             ORDER BY t.node_type) g
$function$

;
CREATE OR REPLACE FUNCTION workflow_db_steps_transitioned()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    changed_count bigint;
    lock_ids uuid[];
    retry_ids uuid[];
    done_ids uuid[];
    done_executions uuid[];
    failed_executions uuid[];
    failures text[];
BEGIN
    -- The rows whose status changed, with their old status: the old and new
    -- transition tables hold the same ids, so both sorted by id line up
    -- row by row (unnest of arrays in step). There is no join of the two:
    -- PL/pgSQL caches each statement's plan from its first call, and a join
    -- planned for one row becomes quadratic for 10,000. For the same reason
    -- every table below is reached through `= ANY (array)` (index scans at
    -- any size). One statement appends the events, sends the NOTIFYs and
    -- collects what the rest needs.
    WITH zipped AS MATERIALIZED (
        SELECT c.*
          FROM (SELECT array_agg(id ORDER BY id) AS id,
                       array_agg(execution_id ORDER BY id) AS execution_id,
                       array_agg(node_id ORDER BY id) AS node_id,
                       array_agg(status ORDER BY id) AS status,
                       array_agg(retry_count ORDER BY id) AS retry_count,
                       array_agg(error ORDER BY id) AS error,
                       array_agg(locked_by ORDER BY id) AS locked_by,
                       array_agg(cardinality(downstream) > 0 ORDER BY id) AS has_downstream,
                       array_agg(node_type ORDER BY id) AS node_type,
                       array_agg(run_after ORDER BY id) AS run_after,
                       array_agg(status = 'pending' AND upstream_pending = 0 AND NOT parked ORDER BY id) AS ready
                  FROM new_rows) n,
               (SELECT array_agg(status ORDER BY id) AS status,
                       array_agg(locked_by ORDER BY id) AS locked_by,
                       array_agg(status = 'pending' AND upstream_pending = 0 AND NOT parked ORDER BY id) AS ready
                  FROM old_rows) o,
               unnest(n.id, n.execution_id, n.node_id, n.status, o.status, n.retry_count,
                      n.error, n.locked_by, o.locked_by, n.has_downstream,
                      n.node_type, n.run_after, n.ready, o.ready)
                 AS c(id, execution_id, node_id, status, from_status, retry_count,
                      error, new_worker, old_worker, has_downstream,
                      node_type, run_after, ready, was_ready)),
    -- Steps that became claimable (upstream finished, execution started or
    -- resumed, retry scheduled, released): one NOTIFY per node type.
    claimable AS (
        SELECT workflow_db_notify_claimable(array_agg(node_type), array_agg(run_after)) AS sent
          FROM zipped WHERE ready AND NOT was_ready),
    changed AS MATERIALIZED (
        SELECT * FROM zipped WHERE status <> from_status),
    events AS (
        INSERT INTO execution_events (execution_id, step_id, from_status, to_status, payload)
        SELECT execution_id, id, from_status, status, jsonb_strip_nulls(jsonb_build_object(
                   'node_id', node_id,
                   'retry_count', retry_count,
                   'worker', coalesce(new_worker, old_worker),
                   'error', CASE WHEN status IN ('failed', 'pending') THEN error END))
          FROM changed
         ORDER BY id),
    -- One NOTIFY per execution and new status (step_id when it is one step).
    notified AS (
        SELECT count(pg_notify('workflow_db_events', json_build_object(
                   'execution_id', g.execution_id,
                   'step_id', CASE WHEN g.steps = 1 THEN g.step_id END,
                   'status', g.status,
                   'steps', g.steps)::text)) AS sent
          FROM (SELECT execution_id, status, count(*) AS steps, (array_agg(id))[1] AS step_id
                  FROM changed
                 GROUP BY execution_id, status
                 ORDER BY execution_id, status) g),
    failed AS (
        SELECT DISTINCT ON (execution_id) execution_id,
               format('step %s failed: %s', node_id, coalesce(error, 'no error message')) AS failure
          FROM changed WHERE status = 'failed'
         ORDER BY execution_id, id)
    SELECT (SELECT count(*) FROM changed),
           (SELECT array_agg(DISTINCT execution_id) FROM changed WHERE status <> 'running'),
           (SELECT array_agg(id) FROM changed WHERE status = 'pending'),
           (SELECT array_agg(id) FROM changed WHERE status IN ('completed', 'skipped') AND has_downstream),
           (SELECT array_agg(DISTINCT execution_id) FROM changed WHERE status IN ('completed', 'skipped')),
           (SELECT array_agg(execution_id ORDER BY execution_id) FROM failed),
           (SELECT array_agg(failure ORDER BY execution_id) FROM failed)
      INTO changed_count, lock_ids, retry_ids, done_ids, done_executions, failed_executions, failures
      FROM notified, claimable;
    IF changed_count = 0 THEN
        RETURN NULL; -- no status changed (heartbeat, counters, parking)
    END IF;
    -- Settling relies on each statement seeing what committed before it.
    PERFORM workflow_db_require_read_committed();
    IF lock_ids IS NULL THEN
        RETURN NULL; -- only claims: no execution is locked
    END IF;

    -- The executions, in id order (already held when the crate wrote the
    -- statement: see the lock order above).
    PERFORM 1 FROM executions x WHERE x.id = ANY (lock_ids) ORDER BY x.id FOR NO KEY UPDATE;

    -- Attempts sent back to pending (retry, reclaimed lease): skipped under a
    -- final execution, parked exactly when their execution is not running.
    IF retry_ids IS NOT NULL THEN
        UPDATE execution_steps s SET status = 'skipped'
          FROM executions e
         WHERE s.id = ANY (retry_ids) AND e.id = s.execution_id
           AND s.status = 'pending' AND e.status IN ('completed', 'failed', 'cancelled');
        UPDATE execution_steps s SET parked = (e.status <> 'running')
          FROM executions e
         WHERE s.id = ANY (retry_ids) AND e.id = s.execution_id
           AND s.status = 'pending' AND s.parked <> (e.status <> 'running');
    END IF;

    -- Unblock: one decrement per finished upstream step, for live executions
    -- (a final execution has no pending step left to unblock).
    IF done_ids IS NOT NULL THEN
        UPDATE execution_steps d SET upstream_pending = d.upstream_pending - u.finished
          FROM (SELECT s.execution_id, t.node_id, count(DISTINCT s.id)::int AS finished
                  FROM execution_steps s
                       JOIN executions e ON e.id = s.execution_id
                       CROSS JOIN LATERAL unnest(s.downstream) AS t(node_id)
                 WHERE s.id = ANY (done_ids) AND e.status IN ('pending', 'running', 'paused')
                 GROUP BY s.execution_id, t.node_id) u
         WHERE d.execution_id = u.execution_id AND d.node_id = u.node_id AND d.status = 'pending';
    END IF;

    -- Settle: a step that failed for good fails its running execution (whose
    -- trigger then skips the rest) ...
    IF failed_executions IS NOT NULL THEN
        UPDATE executions e SET status = 'failed', error = f.failure
          FROM unnest(failed_executions, failures) AS f(id, failure)
         WHERE e.id = f.id AND e.status = 'running';
    END IF;
    -- ... and a running execution whose steps are all final completes.
    IF done_executions IS NOT NULL THEN
        UPDATE executions e SET status = 'completed'
         WHERE e.id = ANY (done_executions) AND e.status = 'running'
           AND NOT EXISTS (SELECT 1 FROM execution_steps s
                            WHERE s.execution_id = e.id AND s.status IN ('pending', 'running'));
    END IF;
    RETURN NULL;
END;
$function$

;
CREATE OR REPLACE FUNCTION workflow_db_steps_inserted()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    execution_ids uuid[];
    any_parked boolean;
    any_unparked boolean;
    final_ids uuid[];
    running_ids uuid[];
    other_ids uuid[];
    untyped_ids uuid[];
    ready_ids uuid[];
BEGIN
    -- (The transition table is only aggregated, and tables are reached
    -- through `= ANY (array)` as an index condition: PL/pgSQL caches each
    -- statement's plan, so no plan may depend on the transition table's size.)
    -- Steps inserted without a node type (plain INSERT, COPY) take their
    -- node's type from the workflow, in one set operation.
    SELECT array_agg(n.id) INTO untyped_ids FROM new_rows n WHERE n.node_type IS NULL;
    IF untyped_ids IS NOT NULL THEN
        UPDATE execution_steps s SET node_type = d.node_type
          FROM (SELECT DISTINCT ON (x.id, nd->>'id') x.id AS execution_id, nd->>'id' AS node_id,
                       nd->>'type' AS node_type
                  FROM executions x
                       JOIN workflows w ON w.id = x.workflow_id
                       CROSS JOIN LATERAL jsonb_array_elements(
                           CASE WHEN jsonb_typeof(w.nodes) = 'array' THEN w.nodes ELSE '[]' END) AS nd
                 WHERE x.id IN (SELECT t.execution_id FROM execution_steps t WHERE t.id = ANY (untyped_ids))
                 ORDER BY x.id, nd->>'id') d
         WHERE s.id = ANY (untyped_ids) AND d.execution_id = s.execution_id AND d.node_id = s.node_id
           AND d.node_type IS NOT NULL;
    END IF;
    SELECT array_agg(DISTINCT n.execution_id), bool_or(n.parked), bool_or(NOT n.parked),
           array_agg(n.id) FILTER (WHERE n.upstream_pending = 0)
      INTO execution_ids, any_parked, any_unparked, ready_ids
      FROM new_rows n WHERE n.status = 'pending';
    IF execution_ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- Lock the executions of the new pending steps (id order): a concurrent
    -- cancel, pause or resume either committed first (seen here) or waits for
    -- this transaction and then sees these steps.
    SELECT array_agg(e.id) FILTER (WHERE e.status IN ('completed', 'failed', 'cancelled')),
           array_agg(e.id) FILTER (WHERE e.status = 'running'),
           array_agg(e.id) FILTER (WHERE e.status IN ('pending', 'paused'))
      INTO final_ids, running_ids, other_ids
      FROM (SELECT x.id, x.status FROM executions x WHERE x.id = ANY (execution_ids)
             ORDER BY x.id FOR NO KEY UPDATE) e;
    IF final_ids IS NOT NULL THEN
        RAISE EXCEPTION 'a pending step cannot be added to execution %: it is final', final_ids[1]
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_steps_pending_under_final',
                  TABLE = 'execution_steps',
                  DETAIL = 'Nothing claims the steps of a final execution; insert the step completed or skipped, or not at all.';
    END IF;
    -- parked = "the execution is not running", where the insert said
    -- otherwise (the executions' other pending steps already agree).
    IF any_parked AND running_ids IS NOT NULL THEN
        UPDATE execution_steps SET parked = false
         WHERE execution_id = ANY (running_ids) AND status = 'pending' AND parked;
    END IF;
    IF any_unparked AND other_ids IS NOT NULL THEN
        UPDATE execution_steps SET parked = true
         WHERE execution_id = ANY (other_ids) AND status = 'pending' AND NOT parked;
    END IF;
    -- New steps a worker can claim (their execution running, nothing upstream).
    IF ready_ids IS NOT NULL AND running_ids IS NOT NULL THEN
        PERFORM workflow_db_notify_claimable(array_agg(s.node_type), array_agg(s.run_after))
           FROM execution_steps s
          WHERE s.id = ANY (ready_ids) AND s.execution_id = ANY (running_ids)
            AND s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked;
    END IF;
    RETURN NULL;
END;
$function$

;
COMMENT ON FUNCTION workflow_db_notify_claimable(text[], timestamptz[]) IS 'Sends one NOTIFY on workflow_db_claimable per node type of the given steps that became claimable: {"node_type", "steps", "run_after" (the earliest)}. Returns the number sent.';
DROP FUNCTION workflow_db_step_queue(text, text);
ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_throttle_check;
ALTER TABLE execution_steps
    DROP COLUMN priority,
    DROP COLUMN queue,
    DROP COLUMN concurrency_key,
    DROP COLUMN throttled;
ALTER TABLE executions
    DROP COLUMN priority,
    DROP COLUMN concurrency_key,
    DROP COLUMN start_after,
    DROP COLUMN dedup_key,
    DROP COLUMN dedup_until;
COMMENT ON FUNCTION workflow_db_steps_inserted() IS 'AFTER INSERT statement trigger on execution_steps: locks the executions of new pending steps, refuses pending steps under a final execution (constraint execution_steps_pending_under_final), corrects parked where it disagrees with the execution''s status.';
COMMENT ON FUNCTION workflow_db_steps_transitioned() IS 'AFTER UPDATE statement trigger on execution_steps: requires READ COMMITTED for status changes, appends one event per status change, one NOTIFY per execution and status, locks the executions of ended attempts in id order, skips or parks retries under final or non-running executions, unblocks downstream steps, and settles each execution once.';
