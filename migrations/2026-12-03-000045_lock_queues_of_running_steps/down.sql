-- workflow_db_steps_transitioned as 000025 left it.
CREATE OR REPLACE FUNCTION workflow_db_steps_transitioned() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed_count bigint;
    lock_ids uuid[];
    retry_ids uuid[];
    done_ids uuid[];
    done_executions uuid[];
    failed_executions uuid[];
    failures text[];
    queue_names text[];
    queue_deltas integer[];
    touched_keys text[];
    own_admitted uuid[];
    started_keys text[];
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
        SELECT c.*,
               c.status = 'running' OR (c.ready AND NOT c.throttled) AS holds,
               (c.from_status = 'running' OR (c.was_ready AND NOT c.was_throttled))
                   AND c.concurrency_key IS NOT DISTINCT FROM c.from_key AS held
          FROM (SELECT array_agg(id ORDER BY id) AS id,
                       array_agg(execution_id ORDER BY id) AS execution_id,
                       array_agg(node_id ORDER BY id) AS node_id,
                       array_agg(status ORDER BY id) AS status,
                       array_agg(retry_count ORDER BY id) AS retry_count,
                       array_agg(error ORDER BY id) AS error,
                       array_agg(locked_by ORDER BY id) AS locked_by,
                       array_agg(cardinality(downstream) > 0 ORDER BY id) AS has_downstream,
                       array_agg(workflow_db_step_queue(queue, node_type) ORDER BY id) AS queue,
                       array_agg(run_after ORDER BY id) AS run_after,
                       array_agg(status = 'pending' AND upstream_pending = 0 AND NOT parked ORDER BY id) AS ready,
                       array_agg(throttled ORDER BY id) AS throttled,
                       array_agg(concurrency_key ORDER BY id) AS concurrency_key
                  FROM new_rows) n,
               (SELECT array_agg(status ORDER BY id) AS status,
                       array_agg(locked_by ORDER BY id) AS locked_by,
                       array_agg(status = 'pending' AND upstream_pending = 0 AND NOT parked ORDER BY id) AS ready,
                       array_agg(throttled ORDER BY id) AS throttled,
                       array_agg(workflow_db_step_queue(queue, node_type) ORDER BY id) AS queue,
                       array_agg(concurrency_key ORDER BY id) AS concurrency_key
                  FROM old_rows) o,
               unnest(n.id, n.execution_id, n.node_id, n.status, o.status, n.retry_count,
                      n.error, n.locked_by, o.locked_by, n.has_downstream,
                      n.queue, o.queue, n.run_after, n.ready, o.ready,
                      n.throttled, o.throttled, n.concurrency_key, o.concurrency_key)
                 AS c(id, execution_id, node_id, status, from_status, retry_count,
                      error, new_worker, old_worker, has_downstream,
                      queue, from_queue, run_after, ready, was_ready,
                      throttled, was_throttled, concurrency_key, from_key)),
    -- Steps that became claimable (upstream finished, execution started or
    -- resumed, retry scheduled, released, admitted by their key): one
    -- NOTIFY per queue.
    claimable AS (
        SELECT workflow_db_notify_claimable(array_agg(queue), array_agg(run_after)) AS sent
          FROM zipped WHERE ready AND NOT throttled AND NOT (was_ready AND NOT was_throttled)),
    -- Running steps per queue: +1 entering running, -1 leaving it.
    queue_delta AS (
        SELECT array_agg(d.queue ORDER BY d.queue) AS names, array_agg(d.delta ORDER BY d.queue) AS deltas
          FROM (SELECT z.queue, 1 AS delta FROM zipped z
                 WHERE z.status = 'running' AND (z.from_status <> 'running' OR z.queue <> z.from_queue)
                UNION ALL
                SELECT z.from_queue, -1 FROM zipped z
                 WHERE z.from_status = 'running' AND (z.status <> 'running' OR z.queue <> z.from_queue)) d),
    keys AS (
        SELECT array_agg(DISTINCT k.key) AS touched
          FROM zipped z, LATERAL (VALUES (z.concurrency_key), (z.from_key)) AS k(key)
         WHERE k.key IS NOT NULL
           AND (z.holds <> z.held OR (z.ready AND NOT z.was_ready)
                OR z.concurrency_key IS DISTINCT FROM z.from_key)),
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
           (SELECT array_agg(failure ORDER BY execution_id) FROM failed),
           queue_delta.names, queue_delta.deltas, keys.touched,
           (SELECT array_agg(id) FROM zipped WHERE holds AND NOT held AND status = 'pending'),
           (SELECT array_agg(DISTINCT concurrency_key) FROM zipped
             WHERE status = 'running' AND NOT held AND concurrency_key IS NOT NULL)
      INTO changed_count, lock_ids, retry_ids, done_ids, done_executions, failed_executions, failures,
           queue_names, queue_deltas, touched_keys, own_admitted, started_keys
      FROM notified, claimable, queue_delta, keys;
    IF changed_count = 0 AND touched_keys IS NULL AND queue_names IS NULL THEN
        RETURN NULL; -- nothing for the state machine (heartbeat, counters, parking)
    END IF;
    IF changed_count > 0 THEN
        -- Settling relies on each statement seeing what committed before it.
        PERFORM workflow_db_require_read_committed();
    END IF;

    -- The executions, in id order (already held when the crate wrote the
    -- statement: see the lock order above); then queues; then keys.
    IF lock_ids IS NOT NULL THEN
        PERFORM 1 FROM executions x WHERE x.id = ANY (lock_ids) ORDER BY x.id FOR NO KEY UPDATE;
    END IF;
    IF queue_names IS NOT NULL AND EXISTS (SELECT 1 FROM queues) THEN
        PERFORM workflow_db_count_queue_running(queue_names, queue_deltas);
    END IF;
    -- The keys this statement may rebalance, here or in the statements it
    -- causes (downstream steps made ready, steps skipped by a settle): the
    -- touched ones and those of the unfinished steps of the executions it
    -- ends attempts of, locked in key order before any nested trigger
    -- locks one (the lock order: executions, queues, keys).
    IF (touched_keys IS NOT NULL OR lock_ids IS NOT NULL) AND EXISTS (SELECT 1 FROM concurrency_limits) THEN
        PERFORM 1 FROM concurrency_limits c
         WHERE c.key = ANY (touched_keys)
            OR c.key IN (SELECT s.concurrency_key FROM execution_steps s
                          WHERE s.execution_id = ANY (lock_ids) AND s.status IN ('pending', 'running')
                            AND s.concurrency_key IS NOT NULL)
         ORDER BY c.key FOR NO KEY UPDATE;
    END IF;

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

    -- Keys last (the lock order: executions, queues, keys).
    IF touched_keys IS NOT NULL AND EXISTS (SELECT 1 FROM concurrency_limits) THEN
        PERFORM workflow_db_rebalance_keys(touched_keys, coalesce(own_admitted, '{}'), started_keys);
    END IF;
    RETURN NULL;
END;
$$;

-- The insert trigger of 000022, with flow control: new ready steps of a
-- limited key are admitted or throttled before anyone can see them, and
-- only claimable ones are notified (by queue).
CREATE OR REPLACE FUNCTION workflow_db_steps_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    execution_ids uuid[];
    any_parked boolean;
    any_unparked boolean;
    final_ids uuid[];
    running_ids uuid[];
    other_ids uuid[];
    untyped_ids uuid[];
    ready_ids uuid[];
    keyed_ids uuid[];
    key_names text[];
    running_queues text[];
    running_keys text[];
BEGIN
    -- Steps inserted already running (a plain INSERT, COPY) count against
    -- their queue and key like a claim: refused on a paused or full queue
    -- and beyond a key's limit. (Counted before the node types are filled
    -- in below, whose update moves the count to the right queue.)
    SELECT array_agg(workflow_db_step_queue(n.queue, n.node_type)),
           array_agg(DISTINCT n.concurrency_key) FILTER (WHERE n.concurrency_key IS NOT NULL)
      INTO running_queues, running_keys
      FROM new_rows n WHERE n.status = 'running';
    IF running_queues IS NOT NULL THEN
        -- The lock order: the executions of the new steps first.
        PERFORM 1 FROM executions x
         WHERE x.id = ANY (ARRAY(SELECT DISTINCT n.execution_id FROM new_rows n))
         ORDER BY x.id FOR NO KEY UPDATE;
    END IF;
    IF running_queues IS NOT NULL AND EXISTS (SELECT 1 FROM queues) THEN
        PERFORM workflow_db_count_queue_running(running_queues,
                                                array_fill(1, ARRAY[cardinality(running_queues)]));
    END IF;
    IF running_keys IS NOT NULL AND EXISTS (SELECT 1 FROM concurrency_limits) THEN
        PERFORM workflow_db_rebalance_keys(running_keys, '{}', running_keys);
    END IF;
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
           array_agg(n.id) FILTER (WHERE n.upstream_pending = 0),
           array_agg(n.id) FILTER (WHERE n.upstream_pending = 0 AND n.concurrency_key IS NOT NULL),
           array_agg(DISTINCT n.concurrency_key) FILTER (WHERE n.upstream_pending = 0)
      INTO execution_ids, any_parked, any_unparked, ready_ids, keyed_ids, key_names
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
    -- otherwise (the executions' other pending steps already agree; the
    -- update's own trigger admits or throttles steps it makes ready).
    IF any_parked AND running_ids IS NOT NULL THEN
        UPDATE execution_steps SET parked = false
         WHERE execution_id = ANY (running_ids) AND status = 'pending' AND parked;
    END IF;
    IF any_unparked AND other_ids IS NOT NULL THEN
        UPDATE execution_steps SET parked = true
         WHERE execution_id = ANY (other_ids) AND status = 'pending' AND NOT parked;
    END IF;
    -- New ready steps of limited keys: admitted while their key has room,
    -- throttled beyond it.
    IF keyed_ids IS NOT NULL AND running_ids IS NOT NULL AND EXISTS (SELECT 1 FROM concurrency_limits) THEN
        PERFORM workflow_db_rebalance_keys(key_names, keyed_ids, '{}');
    END IF;
    -- New steps a worker can claim (their execution running, nothing upstream, admitted).
    IF ready_ids IS NOT NULL AND running_ids IS NOT NULL THEN
        PERFORM workflow_db_notify_claimable(array_agg(workflow_db_step_queue(s.queue, s.node_type)),
                                             array_agg(s.run_after))
           FROM execution_steps s
          WHERE s.id = ANY (ready_ids) AND s.execution_id = ANY (running_ids)
            AND s.status = 'pending' AND s.upstream_pending = 0 AND NOT s.parked AND NOT s.throttled;
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION workflow_db_steps_inserted() IS 'AFTER INSERT statement trigger on execution_steps: locks the executions of new pending steps, refuses pending steps under a final execution (constraint execution_steps_pending_under_final), corrects parked where it disagrees with the execution''s status, admits or throttles new ready steps of limited keys, notifies claimable ones by queue.';
COMMENT ON FUNCTION workflow_db_steps_transitioned() IS 'AFTER UPDATE statement trigger on execution_steps: requires READ COMMITTED for status changes, appends one event per status change, one NOTIFY per execution and status and one per queue with new claimable steps, locks the executions of ended attempts in id order, keeps the running counters of configured queues, skips or parks retries under final or non-running executions, unblocks downstream steps, settles each execution once, and rebalances limited keys.';
