-- Flow control (issue 12): priorities, queues, concurrency keys, delayed
-- start and deduplication windows, enforced by the database for every
-- writer. docs/engine.md ("Flow control") is the guide; the rules:
--
-- * Priority (executions.priority, copied to each step, overridable per
--   node): claims take the highest priority first, then the oldest
--   run_after. Strict: lower priorities wait while higher ones are ready.
-- * Queue: a step's queue is execution_steps.queue, or its node type when
--   NULL, or 'default' (workflow_db_step_queue). A row in `queues` pauses a
--   queue or limits its running steps; claims read the row under a lock and
--   take at most the room left, and the step trigger keeps `running` exact
--   and refuses any writer that would start a step beyond the limit or in a
--   paused queue.
-- * Concurrency key (execution_steps.concurrency_key, from the execution or
--   the node): a row in `concurrency_limits` bounds the key's steps that are
--   running or admitted (ready and not throttled). Ready steps beyond the
--   limit are `throttled`: out of the claim index, so a key at its limit
--   never delays other keys, and claims need no lock for keys at all. When a
--   slot frees, the trigger admits the next throttled step (highest
--   priority, oldest). A throttled step can never be running (CHECK).
-- * Delayed start (executions.start_after): the execution stays pending
--   (its steps parked) until then; engine::start_due_executions (run by the
--   maintenance loop) starts it. Nothing may start it earlier.
-- * Deduplication (executions.dedup_key, dedup_until): an insert whose key
--   matches an execution of the same workflow that still holds it (before
--   its dedup_until, or unfinished when that is NULL) is refused;
--   engine::start_execution returns the existing execution instead.

ALTER TABLE executions
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN concurrency_key text,
    ADD COLUMN start_after timestamptz,
    ADD COLUMN dedup_key text,
    ADD COLUMN dedup_until timestamptz;
COMMENT ON COLUMN executions.priority IS 'Claim priority of the execution''s steps (higher first; default 0), copied to each step at start unless its node sets config.priority.';
COMMENT ON COLUMN executions.concurrency_key IS 'Concurrency key of the execution''s steps (a tenant, a customer), copied to each step at start unless its node sets config.concurrency_key; limited by a concurrency_limits row.';
COMMENT ON COLUMN executions.start_after IS 'Delayed start: the execution stays pending until this time (engine::start_due_executions starts it); NULL starts at once.';
COMMENT ON COLUMN executions.dedup_key IS 'Deduplication key: an insert with the same workflow and key is refused while this execution holds it (until dedup_until, or while unfinished when dedup_until is NULL).';
COMMENT ON COLUMN executions.dedup_until IS 'Until when dedup_key holds (a window from the start); NULL: while the execution is unfinished.';

ALTER TABLE execution_steps
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN queue text,
    ADD COLUMN concurrency_key text,
    ADD COLUMN throttled boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN execution_steps.priority IS 'Claim priority (higher first, then oldest run_after); strict.';
COMMENT ON COLUMN execution_steps.queue IS 'Queue the step runs on; NULL means its node type (or ''default'' without one): see workflow_db_step_queue.';
COMMENT ON COLUMN execution_steps.concurrency_key IS 'Concurrency key (a tenant, a customer); a concurrency_limits row bounds its running and admitted steps.';
COMMENT ON COLUMN execution_steps.throttled IS 'Held back by its concurrency key''s limit: not claimable until the trigger admits it when a slot frees. Never true for a running step.';
ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_throttle_check
    CHECK (NOT (throttled AND status = 'running')) NOT VALID;
COMMENT ON CONSTRAINT execution_steps_throttle_check ON execution_steps IS 'A step held back by its concurrency key (throttled) is never running.';

CREATE FUNCTION workflow_db_step_queue(queue text, node_type text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT coalesce(queue, node_type, 'default') $$;
COMMENT ON FUNCTION workflow_db_step_queue(text, text) IS 'The queue a step runs on: its queue column, else its node type, else ''default''.';

CREATE TABLE queues (
    name text PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false,
    max_running integer CHECK (max_running > 0),
    running integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE queues IS 'Queues that are paused or limited (a queue without a row runs freely). Claims lock the row and take at most max_running - running steps; the step trigger keeps running exact.';
COMMENT ON COLUMN queues.name IS 'Queue name (a step''s workflow_db_step_queue).';
COMMENT ON COLUMN queues.paused IS 'Paused: nothing is claimed or started on the queue; running steps finish.';
COMMENT ON COLUMN queues.max_running IS 'Most steps of the queue running at once; NULL: no limit.';
COMMENT ON COLUMN queues.running IS 'Steps of the queue running now, kept by the step trigger (counted when the row is inserted).';
COMMENT ON COLUMN queues.created_at IS 'When the queue was first configured.';
COMMENT ON COLUMN queues.updated_at IS 'Last change of the row (counter included).';
CREATE TRIGGER queues_set_updated_at BEFORE UPDATE ON queues
    FOR EACH ROW EXECUTE FUNCTION workflow_db_set_updated_at();

-- A new queue row starts with the exact count: writers of steps are held
-- off (SHARE lock) while it counts, so no transition is missed between the
-- count and the row becoming visible to the step trigger.
CREATE FUNCTION workflow_db_queue_count_running() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM workflow_db_require_read_committed();
    LOCK TABLE execution_steps IN SHARE MODE;
    SELECT count(*) INTO NEW.running FROM execution_steps s
     WHERE s.status = 'running' AND workflow_db_step_queue(s.queue, s.node_type) = NEW.name;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_queue_count_running() IS 'Sets a new queues row''s running counter to the queue''s running steps, counted while step writers wait.';
CREATE TRIGGER queues_count_running BEFORE INSERT ON queues
    FOR EACH ROW EXECUTE FUNCTION workflow_db_queue_count_running();

CREATE TABLE concurrency_limits (
    key text PRIMARY KEY,
    max_running integer NOT NULL CHECK (max_running > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE concurrency_limits IS 'Limits per concurrency key: at most max_running steps of the key running or admitted (ready, not throttled). Keys without a row are not limited.';
COMMENT ON COLUMN concurrency_limits.key IS 'The concurrency key (execution_steps.concurrency_key).';
COMMENT ON COLUMN concurrency_limits.max_running IS 'Most steps of the key running or admitted at once.';
COMMENT ON COLUMN concurrency_limits.created_at IS 'When the limit was set first.';
COMMENT ON COLUMN concurrency_limits.updated_at IS 'Last change of the limit.';
CREATE TRIGGER concurrency_limits_set_updated_at BEFORE UPDATE ON concurrency_limits
    FOR EACH ROW EXECUTE FUNCTION workflow_db_set_updated_at();

-- Running steps per queue: +1/-1 per step entering or leaving running (by
-- its queue before and after), for queues with a row; a start beyond the
-- limit, or on a paused queue, is refused. Rows locked in name order.
CREATE FUNCTION workflow_db_count_queue_running(queue_names text[], deltas integer[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    q record;
BEGIN
    PERFORM workflow_db_require_read_committed();
    PERFORM 1 FROM queues u WHERE u.name = ANY (queue_names) ORDER BY u.name FOR NO KEY UPDATE;
    FOR q IN
        UPDATE queues u SET running = u.running + d.delta
          FROM (SELECT t.name, sum(t.delta)::int AS delta
                  FROM unnest(queue_names, deltas) AS t(name, delta)
                 GROUP BY t.name) d
         WHERE u.name = d.name AND d.delta <> 0
        RETURNING u.name, u.paused, u.max_running, u.running, d.delta
    LOOP
        IF q.delta > 0 AND (q.paused OR q.running > q.max_running) THEN
            RAISE EXCEPTION 'queue % is %', q.name,
                    CASE WHEN q.paused THEN 'paused'
                         ELSE format('at its limit of %s running step(s)', q.max_running) END
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'queues_max_running',
                      TABLE = 'execution_steps',
                      DETAIL = format('queue %s: paused = %s, max_running = %s, running = %s',
                                      q.name, q.paused, q.max_running, q.running);
        ELSIF q.delta < 0 AND NOT q.paused AND q.max_running IS NOT NULL THEN
            -- Room freed on a limited queue: wake its workers.
            PERFORM workflow_db_notify_claimable(array_fill(q.name, ARRAY[-q.delta]),
                                                 array_fill(statement_timestamp(), ARRAY[-q.delta]));
        END IF;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION workflow_db_count_queue_running(text[], integer[]) IS 'Adds the deltas to the queues'' running counters (rows locked in name order), refuses a start on a paused queue or beyond max_running, and notifies workflow_db_claimable when a limited queue gains room.';

-- Admission for limited keys: for each key (rows locked in key order),
-- running + admitted must not exceed max_running. The slots left after the
-- running steps and the steps admitted by earlier statements go to the
-- best (highest priority, oldest run_after, id) of: the steps this
-- statement admitted (`own`: uncommitted, so no worker is claiming them;
-- NULL when a limit changed: every admitted step) and the throttled ready
-- steps; the rest of `own` is throttled. So a step that became ready in
-- this statement never keeps a slot a higher-priority throttled step
-- could have. Steps another transaction holds are skipped (SKIP LOCKED:
-- never waits, so no deadlock), and admitted by the next rebalance of
-- their key or the maintenance loop's. A statement that started a step of
-- the key that held no slot (`started`) and leaves the key over its limit
-- is refused.
CREATE FUNCTION workflow_db_rebalance_keys(keys text[], own uuid[], started text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lim record;
    running_n integer;
    admitted_n integer;
    own_n integer;
    avail integer;
    chosen uuid[];
BEGIN
    -- Counts after the key's lock must see what committed while waiting.
    PERFORM workflow_db_require_read_committed();
    FOR lim IN SELECT c.key, c.max_running FROM concurrency_limits c
                WHERE c.key = ANY (keys) ORDER BY c.key FOR NO KEY UPDATE
    LOOP
        -- One statement, one snapshot: a claim (which takes no key lock)
        -- moving an admitted step to running is counted once, either way.
        SELECT (SELECT count(*) FROM execution_steps r
                 WHERE r.concurrency_key = lim.key AND r.status = 'running'),
               count(*), count(*) FILTER (WHERE own IS NULL OR s.id = ANY (own))
          INTO running_n, admitted_n, own_n
          FROM execution_steps s
         WHERE s.concurrency_key = lim.key AND s.status = 'pending' AND s.upstream_pending = 0
           AND NOT s.parked AND NOT s.throttled;
        avail := lim.max_running - running_n - (admitted_n - own_n);
        -- The candidates, each part read in admission order through
        -- execution_steps_key_ready_idx (only the first `avail` throttled
        -- ones can win); then the best `avail` of them still free.
        chosen := ARRAY(
            SELECT x.id FROM execution_steps x
             WHERE x.id = ANY (ARRAY(
                     (SELECT t.id FROM execution_steps t
                       WHERE t.concurrency_key = lim.key AND t.throttled AND t.status = 'pending'
                         AND t.upstream_pending = 0 AND NOT t.parked
                       ORDER BY t.priority DESC, t.run_after, t.id
                       LIMIT greatest(avail, 0))
                     UNION ALL
                     (SELECT a.id FROM execution_steps a
                       WHERE a.concurrency_key = lim.key AND NOT a.throttled AND a.status = 'pending'
                         AND a.upstream_pending = 0 AND NOT a.parked
                         AND (own IS NULL OR a.id = ANY (own)))))
               AND x.status = 'pending' AND x.upstream_pending = 0 AND NOT x.parked
             ORDER BY x.priority DESC, x.run_after, x.id
             LIMIT greatest(avail, 0)
             FOR UPDATE SKIP LOCKED);
        UPDATE execution_steps s SET throttled = true
         WHERE s.id = ANY (ARRAY(
                 SELECT x.id FROM execution_steps x
                  WHERE x.concurrency_key = lim.key AND x.status = 'pending' AND x.upstream_pending = 0
                    AND NOT x.parked AND NOT x.throttled AND (own IS NULL OR x.id = ANY (own))
                    AND NOT (x.id = ANY (chosen))
                  FOR UPDATE SKIP LOCKED));
        UPDATE execution_steps s SET throttled = false
         WHERE s.id = ANY (chosen) AND s.throttled;
        IF avail < 0 AND lim.key = ANY (started) THEN
            RAISE EXCEPTION 'concurrency key % is at its limit of % step(s)', lim.key, lim.max_running
                USING ERRCODE = 'check_violation',
                      CONSTRAINT = 'concurrency_limits_max_running',
                      TABLE = 'execution_steps',
                      DETAIL = format('key %s: max_running = %s, running = %s, admitted = %s',
                                      lim.key, lim.max_running, running_n, admitted_n);
        END IF;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION workflow_db_rebalance_keys(text[], uuid[], text[]) IS 'Keeps running + admitted steps of each limited key within its max_running: the free slots go to the best of the steps the calling statement admitted (all admitted ones when own is NULL) and the throttled ready steps, the others are throttled; refuses a start that holds no slot.';

-- A new limit holds step writers off (SHARE lock on execution_steps) until
-- it commits, so no writer that saw no limit admits steps beside its
-- first rebalance.
CREATE FUNCTION workflow_db_concurrency_limit_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE execution_steps IN SHARE MODE;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_concurrency_limit_inserted() IS 'Holds step writers off while a new concurrency limit is inserted, so its first rebalance counts every step of the key.';
CREATE TRIGGER concurrency_limits_inserted BEFORE INSERT ON concurrency_limits
    FOR EACH ROW EXECUTE FUNCTION workflow_db_concurrency_limit_inserted();

-- A new, raised or lowered limit rebalances its key; a removed one
-- releases the key's throttled steps.
CREATE FUNCTION workflow_db_concurrency_limit_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE execution_steps SET throttled = false
         WHERE concurrency_key = OLD.key AND throttled AND status = 'pending';
        RETURN OLD;
    END IF;
    PERFORM workflow_db_rebalance_keys(ARRAY[NEW.key], NULL, NULL);
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_concurrency_limit_changed() IS 'Rebalances a key whose limit was set or changed; releases the throttled steps of a key whose limit was removed.';
CREATE TRIGGER concurrency_limits_changed AFTER INSERT OR UPDATE OF max_running OR DELETE ON concurrency_limits
    FOR EACH ROW EXECUTE FUNCTION workflow_db_concurrency_limit_changed();

-- Deduplication: the earlier execution an insert with this key duplicates,
-- under a transaction-level advisory lock on (workflow, key), so two racing
-- inserts are ordered and the second sees the first once it committed.
CREATE FUNCTION workflow_db_find_duplicate(workflow uuid, key text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    found_id uuid;
BEGIN
    -- The lookup after the lock must see a racing insert that committed.
    PERFORM workflow_db_require_read_committed();
    PERFORM pg_advisory_xact_lock(hashtextextended(workflow::text || '/' || key, 1463897154));
    SELECT x.id INTO found_id FROM executions x
     WHERE x.workflow_id = workflow AND x.dedup_key = key
       AND CASE WHEN x.dedup_until IS NULL THEN x.status IN ('pending', 'running', 'paused')
                ELSE x.dedup_until > statement_timestamp() END
     ORDER BY x.created_at DESC
     LIMIT 1;
    RETURN found_id;
END;
$$;
COMMENT ON FUNCTION workflow_db_find_duplicate(uuid, text) IS 'The newest execution of the workflow that holds this dedup key (before its dedup_until, or unfinished when that is NULL), taking the (workflow, key) advisory lock for the rest of the transaction; NULL when there is none.';

CREATE FUNCTION workflow_db_execution_dedup() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    dup uuid;
BEGIN
    dup := workflow_db_find_duplicate(NEW.workflow_id, NEW.dedup_key);
    IF dup IS NOT NULL THEN
        RAISE EXCEPTION 'execution % of workflow % has the same dedup key', dup, NEW.workflow_id
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'executions_dedup',
                  TABLE = 'executions',
                  DETAIL = format('dedup_key %s, existing execution %s', NEW.dedup_key, dup);
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_execution_dedup() IS 'Refuses an execution whose dedup key duplicates an earlier one (workflow_db_find_duplicate).';
CREATE TRIGGER executions_dedup BEFORE INSERT ON executions
    FOR EACH ROW WHEN (NEW.dedup_key IS NOT NULL) EXECUTE FUNCTION workflow_db_execution_dedup();

-- Deleted steps (a deleted execution's, by cascade) leave their queue's
-- running count and free their key's slots.
CREATE FUNCTION workflow_db_steps_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    queue_names text[];
    key_names text[];
BEGIN
    SELECT array_agg(workflow_db_step_queue(o.queue, o.node_type)) FILTER (WHERE o.status = 'running'),
           array_agg(DISTINCT o.concurrency_key)
               FILTER (WHERE o.concurrency_key IS NOT NULL
                         AND (o.status = 'running'
                              OR (o.status = 'pending' AND o.upstream_pending = 0 AND NOT o.parked
                                  AND NOT o.throttled)))
      INTO queue_names, key_names
      FROM old_rows o;
    IF queue_names IS NOT NULL AND EXISTS (SELECT 1 FROM queues) THEN
        PERFORM workflow_db_count_queue_running(queue_names,
                                                array_fill(-1, ARRAY[cardinality(queue_names)]));
    END IF;
    IF key_names IS NOT NULL AND EXISTS (SELECT 1 FROM concurrency_limits) THEN
        PERFORM workflow_db_rebalance_keys(key_names, '{}', '{}');
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION workflow_db_steps_deleted() IS 'AFTER DELETE statement trigger on execution_steps: deleted running steps leave their queue''s running count; keys that lost a running or admitted step admit the next.';
CREATE TRIGGER execution_steps_deleted AFTER DELETE ON execution_steps
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION workflow_db_steps_deleted();

-- Delayed start: refuse pending -> running before start_after, and an
-- execution inserted already started with a start_after still ahead.
CREATE FUNCTION workflow_db_execution_start_after() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'execution % may not start before %', NEW.id, NEW.start_after
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'executions_start_after',
              TABLE = 'executions',
              DETAIL = format('start_after = %s', NEW.start_after),
              HINT = 'Set start_after to NULL (or an earlier time) in the same UPDATE to start it now.';
END;
$$;
COMMENT ON FUNCTION workflow_db_execution_start_after() IS 'Refuses to start an execution before its start_after.';
CREATE TRIGGER executions_start_after BEFORE UPDATE OF status ON executions
    FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status = 'running'
                       AND NEW.start_after > statement_timestamp())
    EXECUTE FUNCTION workflow_db_execution_start_after();
CREATE TRIGGER executions_inserted_start_after BEFORE INSERT ON executions
    FOR EACH ROW WHEN (NEW.status IN ('running', 'paused') AND NEW.start_after > statement_timestamp())
    EXECUTE FUNCTION workflow_db_execution_start_after();

-- Claimable notifications by queue (replaces the node-type form of 000022;
-- only this migration's trigger functions call it).
-- squawk-ignore ban-drop-function
DROP FUNCTION workflow_db_notify_claimable(text[], timestamptz[]);
CREATE FUNCTION workflow_db_notify_claimable(queue_names text[], run_afters timestamptz[]) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT count(pg_notify('workflow_db_claimable', json_build_object(
               'queue', g.queue, 'steps', g.steps, 'run_after', g.run_after)::text))
      FROM (SELECT t.queue, count(*) AS steps, min(t.run_after) AS run_after
              FROM unnest(queue_names, run_afters) AS t(queue, run_after)
             GROUP BY t.queue
             ORDER BY t.queue) g
$$;
COMMENT ON FUNCTION workflow_db_notify_claimable(text[], timestamptz[]) IS 'Sends one NOTIFY on workflow_db_claimable per queue of the given steps that became claimable: {"queue", "steps", "run_after" (the earliest)}. Returns the number sent.';

-- The statement trigger of 000015/000022, with flow control: claimable
-- means ready and not throttled (and is notified by queue); running
-- counters of configured queues follow every start and finish; keys whose
-- steps gained or lost a slot, or became ready, are rebalanced.
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
