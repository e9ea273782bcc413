-- Durable timers and signals (issue 12): two node types the engine runs
-- itself, with no worker holding anything while they wait. docs/engine.md
-- ("Timers and signals") is the guide; the rules:
--
-- * A node of type 'workflow_db.timer' (config.seconds: a delay counted from
--   the moment its upstream steps are done, from its insert (or the
--   execution's start_after) for a root node; or config.until: an RFC 3339
--   time with its offset) completes when its time
--   comes, with output {"due_at", "fired_at"}.
-- * A node of type 'workflow_db.signal' (config.signal: a name; optional
--   config.timeout_seconds) waits for a signal of that name sent to its
--   execution (a row of execution_signals); the signal's payload becomes its
--   output. Signals are a mailbox per execution and name, first in first
--   out: one sent before the node is reached is kept until it is; each
--   signal is delivered to at most one step and each step takes at most one
--   (unique execution_signals.delivered_to). Without a signal by the
--   timeout, the step fails (and with it the execution, like any failure;
--   engine::replay_execution waits again).
-- * The database arms the wait: the step's wake_at is when the engine must
--   look at it (the timer's time; the signal's deadline, or now when a
--   signal is already there). engine::fire_due_waits (the maintenance
--   loop, every round; engine::send_signal for its own execution) takes the
--   due steps, in the engine's lock order (executions, then steps, then
--   signals), and runs each as a pending -> running -> completed (or
--   failed) transition in one transaction, so the history shows it like any
--   other step (worker 'workflow-db:waits').
-- * The types starting with 'workflow_db.' are the engine's: no queue row
--   may name them, a wait step has no queue and no concurrency key of its
--   own (it occupies no worker), and no worker claims them.

ALTER TABLE execution_steps
    ADD COLUMN wait_seconds double precision,
    ADD COLUMN wait_until timestamptz,
    ADD COLUMN wait_signal text,
    ADD COLUMN wake_at timestamptz;
COMMENT ON COLUMN execution_steps.wait_seconds IS 'Wait steps: the timer''s delay (config.seconds), or the signal''s timeout (config.timeout_seconds), in seconds counted from the moment the step is ready; set by the database at insert.';
COMMENT ON COLUMN execution_steps.wait_until IS 'Wait steps: the timer''s absolute time (config.until), or the deadline of the signal wait in progress (armed when the step becomes ready).';
COMMENT ON COLUMN execution_steps.wait_signal IS 'Signal steps: the name of the signal the step waits for (config.signal).';
COMMENT ON COLUMN execution_steps.wake_at IS 'Wait steps: when engine::fire_due_waits looks at the ready step next (timer due, signal deadline, or now when a signal waits for it); NULL: a signal wait without timeout and no signal yet.';

ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_wait_check CHECK (
    CASE WHEN node_type IN ('workflow_db.timer', 'workflow_db.signal')
         THEN queue IS NULL AND concurrency_key IS NULL
              AND (wait_signal IS NULL OR node_type = 'workflow_db.signal')
         ELSE wait_seconds IS NULL AND wait_until IS NULL AND wait_signal IS NULL AND wake_at IS NULL
              AND NOT starts_with(workflow_db_step_queue(queue, node_type), 'workflow_db.') END) NOT VALID;
COMMENT ON CONSTRAINT execution_steps_wait_check ON execution_steps IS 'Wait steps (workflow_db.timer, workflow_db.signal) have no queue and no concurrency key of their own; other steps have no wait columns and no queue in the engine''s namespace workflow_db.*.';

ALTER TABLE queues ADD CONSTRAINT queues_reserved_name CHECK (NOT starts_with(name, 'workflow_db.')) NOT VALID;
COMMENT ON CONSTRAINT queues_reserved_name ON queues IS 'Queues named workflow_db.* are the engine''s own (timers, signals): they cannot be paused or limited (pause their executions instead).';

CREATE TABLE execution_signals (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    execution_id uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    name text NOT NULL CHECK (name <> '' AND length(name) <= 200),
    payload jsonb,
    sent_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_to uuid REFERENCES execution_steps (id) ON DELETE CASCADE,
    delivered_at timestamptz,
    CONSTRAINT execution_signals_delivery_check CHECK ((delivered_to IS NULL) = (delivered_at IS NULL))
);
COMMENT ON TABLE execution_signals IS 'Signals sent to executions: a mailbox per execution and name, first in first out. A workflow_db.signal step takes the oldest undelivered one of its name; one sent before the step is ready is kept.';
COMMENT ON COLUMN execution_signals.id IS 'Primary key (UUIDv7 from the crate; gen_random_uuid() for other writers).';
COMMENT ON COLUMN execution_signals.execution_id IS 'The execution it was sent to; deleting the execution deletes its signals.';
COMMENT ON COLUMN execution_signals.name IS 'Signal name (config.signal of the nodes that wait for it).';
COMMENT ON COLUMN execution_signals.payload IS 'JSON payload: the output of the step it is delivered to.';
COMMENT ON COLUMN execution_signals.sent_at IS 'When it was sent (clock_timestamp(): signals sent in one transaction keep their order); delivery order within a name.';
COMMENT ON COLUMN execution_signals.delivered_to IS 'The step that took it; NULL while undelivered. Unique: a step takes at most one signal.';
COMMENT ON COLUMN execution_signals.delivered_at IS 'When it was delivered; NULL while undelivered.';
-- squawk-ignore require-concurrent-index-creation
CREATE UNIQUE INDEX execution_signals_delivered_to_key ON execution_signals (delivered_to);
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX execution_signals_undelivered_idx ON execution_signals (execution_id, name, sent_at, id)
    WHERE delivered_to IS NULL;

-- The armed state of a wait step that becomes ready at `base`: a timer
-- wakes at base + delay (or its absolute time, the later of the two); a
-- signal wait's deadline is base + timeout (NULL without one), and it wakes
-- at its deadline, or at once when a signal of its name is already waiting.
CREATE FUNCTION workflow_db_wait_armed(execution uuid, signal text, delay interval, until timestamptz,
                                       base timestamptz, OUT armed_until timestamptz, OUT armed_wake timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF signal IS NULL THEN
        armed_until := until;
        armed_wake := greatest(base + delay, until);
    ELSE
        armed_until := base + delay;
        armed_wake := CASE WHEN EXISTS (SELECT 1 FROM execution_signals g
                                         WHERE g.execution_id = execution AND g.name = signal
                                           AND g.delivered_to IS NULL)
                           THEN statement_timestamp() ELSE armed_until END;
    END IF;
END;
$$;
COMMENT ON FUNCTION workflow_db_wait_armed(uuid, text, interval, timestamptz, timestamptz) IS 'The wait_until and wake_at of a wait step that becomes ready at base (timer: base + delay or its absolute time; signal: deadline base + timeout, wake now when a signal waits).';

-- What is wrong with a wait node's config (NULL when nothing).
CREATE FUNCTION workflow_db_wait_config_error(node_type text, config jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN node_type NOT IN ('workflow_db.timer', 'workflow_db.signal') THEN
            format('node type %s is reserved: the engine''s own types are workflow_db.timer and workflow_db.signal', node_type)
        WHEN config IS NULL THEN 'the node is not in its workflow''s graph'
        WHEN config ? 'queue' OR config ? 'concurrency_key' THEN
            'a wait node takes no config.queue or config.concurrency_key (it occupies no worker)'
        WHEN node_type = 'workflow_db.timer' AND NOT (config ? 'seconds' OR config ? 'until') THEN
            'a timer needs config.seconds (a delay) or config.until (an RFC 3339 time)'
        WHEN node_type = 'workflow_db.timer' AND config ? 'seconds'
             AND (jsonb_typeof(config->'seconds') <> 'number' OR (config->>'seconds')::float8 < 0) THEN
            'config.seconds must be a number of seconds, 0 or more'
        WHEN node_type = 'workflow_db.timer' AND config ? 'until'
             AND (jsonb_typeof(config->'until') <> 'string'
                  OR config->>'until' !~ '^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$') THEN
            'config.until must be an RFC 3339 time with its offset (2026-12-24T18:00:00Z), as a string'
        WHEN node_type = 'workflow_db.signal'
             AND (jsonb_typeof(config->'signal') IS DISTINCT FROM 'string' OR config->>'signal' = ''
                  OR length(config->>'signal') > 200) THEN
            'a signal node needs config.signal, a name of 1 to 200 characters'
        WHEN node_type = 'workflow_db.signal' AND config ? 'timeout_seconds'
             AND (jsonb_typeof(config->'timeout_seconds') <> 'number' OR (config->>'timeout_seconds')::float8 <= 0) THEN
            'config.timeout_seconds must be a number of seconds, more than 0'
    END
$$;
COMMENT ON FUNCTION workflow_db_wait_config_error(text, jsonb) IS 'What is wrong with the config of a workflow_db.* node, or NULL.';

-- The wait steps `ids` with their node's config (NULL when the node is not
-- in the graph), whether they are ready, and the time their wait counts
-- from when they are (now, or the execution's delayed start).
CREATE FUNCTION workflow_db_wait_configs(ids uuid[])
    RETURNS TABLE (id uuid, execution_id uuid, node_id text, node_type text, ready boolean,
                   base timestamptz, config jsonb)
LANGUAGE sql STABLE AS $$
    SELECT s.id, s.execution_id, s.node_id, s.node_type,
           s.status = 'pending' AND s.upstream_pending = 0,
           greatest(statement_timestamp(), x.start_after),
           (SELECT nd->'config' FROM jsonb_array_elements(
                CASE WHEN jsonb_typeof(w.nodes) = 'array' THEN w.nodes ELSE '[]' END) AS nd
             WHERE nd->>'id' = s.node_id LIMIT 1)
      FROM execution_steps s JOIN executions x ON x.id = s.execution_id JOIN workflows w ON w.id = x.workflow_id
     WHERE s.id = ANY (ids)
$$;
COMMENT ON FUNCTION workflow_db_wait_configs(uuid[]) IS 'Wait steps with their node''s config, readiness and the time a ready one''s wait counts from (workflow_db_steps_wait_setup).';

-- Inserted wait steps take their wait from their node's config (the graph
-- is the one source: every writer gets the same wait), and the ready ones
-- are armed. An AFTER statement trigger, after execution_steps_inserted
-- (which gives untyped rows their node type): the executions of steps
-- inserted together with them are visible only from here.
CREATE FUNCTION workflow_db_steps_wait_setup() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    candidate_ids uuid[];
    wait_ids uuid[];
    bad record;
BEGIN
    SELECT array_agg(n.id) INTO candidate_ids FROM new_rows n
     WHERE n.node_type IS NULL OR starts_with(n.node_type, 'workflow_db.');
    IF candidate_ids IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(s.id) INTO wait_ids FROM execution_steps s
     WHERE s.id = ANY (candidate_ids) AND starts_with(s.node_type, 'workflow_db.');
    IF wait_ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- A wait is armed with a look at the signals sent so far: a fresh
    -- snapshot per statement, as every status change needs.
    PERFORM workflow_db_require_read_committed();
    SELECT c.node_id, c.execution_id, workflow_db_wait_config_error(c.node_type, c.config) AS error
      INTO bad FROM workflow_db_wait_configs(wait_ids) c
     WHERE workflow_db_wait_config_error(c.node_type, c.config) IS NOT NULL
     ORDER BY c.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'step % of execution % cannot wait: %', bad.node_id, bad.execution_id, bad.error
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_steps_wait_check',
                  TABLE = 'execution_steps';
    END IF;
    UPDATE execution_steps s
       SET wait_seconds = d.seconds, wait_signal = d.signal,
           wait_until = CASE WHEN d.ready THEN a.armed_until ELSE d.until END,
           wake_at = CASE WHEN d.ready THEN a.armed_wake END
      FROM (SELECT c.id, c.ready, c.base, c.execution_id,
                   (c.config->>CASE WHEN c.node_type = 'workflow_db.timer' THEN 'seconds' ELSE 'timeout_seconds' END)::float8
                       AS seconds,
                   CASE WHEN c.node_type = 'workflow_db.timer' THEN (c.config->>'until')::timestamptz END AS until,
                   CASE WHEN c.node_type = 'workflow_db.signal' THEN c.config->>'signal' END AS signal
              FROM workflow_db_wait_configs(wait_ids) c) d
           CROSS JOIN LATERAL workflow_db_wait_armed(d.execution_id, d.signal, d.seconds * interval '1 second',
                                                     d.until, d.base) a
     WHERE s.id = d.id;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION workflow_db_steps_wait_setup() IS 'AFTER INSERT statement trigger on execution_steps: wait steps (workflow_db.timer, workflow_db.signal) take wait_seconds, wait_until and wait_signal from their node''s config (refused with check_violation when it is wrong), and the ready ones are armed (workflow_db_wait_armed).';
CREATE TRIGGER execution_steps_wait_setup AFTER INSERT ON execution_steps
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION workflow_db_steps_wait_setup();

-- A wait step becoming ready (upstream done, or back to pending by a replay
-- or retry) is armed. For a signal wait, the execution is locked first (the
-- engine's statements hold it already): a signal sent at the same moment
-- either committed first (seen here) or waits and then finds the step ready.
CREATE FUNCTION workflow_db_step_arm_wait() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.wait_signal IS NOT NULL THEN
        PERFORM 1 FROM executions x WHERE x.id = NEW.execution_id FOR NO KEY UPDATE;
    END IF;
    SELECT a.armed_until, a.armed_wake INTO NEW.wait_until, NEW.wake_at
      FROM workflow_db_wait_armed(NEW.execution_id, NEW.wait_signal, NEW.wait_seconds * interval '1 second',
                                  NEW.wait_until, statement_timestamp()) a;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION workflow_db_step_arm_wait() IS 'BEFORE UPDATE trigger on execution_steps (wait steps becoming ready only): sets wait_until and wake_at (workflow_db_wait_armed).';
CREATE TRIGGER execution_steps_wait_arm BEFORE UPDATE ON execution_steps
    FOR EACH ROW WHEN ((NEW.wait_seconds IS NOT NULL OR NEW.wait_until IS NOT NULL OR NEW.wait_signal IS NOT NULL)
                       AND NEW.status = 'pending' AND NEW.upstream_pending = 0
                       AND (OLD.status <> 'pending' OR OLD.upstream_pending <> 0))
    EXECUTE FUNCTION workflow_db_step_arm_wait();

-- A signal may only be sent to an unfinished execution; the steps waiting
-- for it are woken (wake_at now). One statement trigger: the executions of
-- all the statement's signals are locked first, in id order (the engine's
-- lock order: a multi-row INSERT listing them in any order cannot deadlock
-- with a batch that locks them in order), then read, then the steps woken.
CREATE FUNCTION workflow_db_signals_sent() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    execution_ids uuid[];
    refused record;
BEGIN
    -- The wake-up reads the steps as they are now (a step that just became
    -- ready must be seen): a fresh snapshot per statement.
    PERFORM workflow_db_require_read_committed();
    SELECT array_agg(DISTINCT n.execution_id) INTO execution_ids FROM new_rows n;
    PERFORM 1 FROM executions e WHERE e.id = ANY (execution_ids) ORDER BY e.id FOR NO KEY UPDATE;
    SELECT e.id, e.status INTO refused FROM executions e
     WHERE e.id = ANY (execution_ids) AND e.status IN ('completed', 'failed', 'cancelled')
     ORDER BY e.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'execution % is %: it takes no more signals', refused.id, refused.status
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'execution_signals_unfinished',
                  TABLE = 'execution_signals',
                  HINT = 'Signals are for executions that may still wait for them (pending, running, paused).';
    END IF;
    UPDATE execution_steps s SET wake_at = statement_timestamp()
      FROM (SELECT DISTINCT n.execution_id, n.name FROM new_rows n) g
     WHERE s.execution_id = ANY (execution_ids)
       AND s.execution_id = g.execution_id AND s.wait_signal = g.name
       AND s.status = 'pending' AND s.upstream_pending = 0
       AND (s.wake_at IS NULL OR s.wake_at > statement_timestamp());
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION workflow_db_signals_sent() IS 'AFTER INSERT statement trigger on execution_signals: requires READ COMMITTED, locks the signals'' executions in id order, refuses a signal to a final execution (check_violation, constraint execution_signals_unfinished) and wakes the steps waiting for the signals.';
CREATE TRIGGER execution_signals_sent AFTER INSERT ON execution_signals
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION workflow_db_signals_sent();

-- What a step waits for (000035), with the waits of timers and signals.
-- Codes: not_found, finished, running, execution_final, delayed_start,
-- execution_pending, execution_paused, upstream, timer, signal, retry_backoff, scheduled,
-- concurrency_key, queue_paused, queue_full, claimable.
CREATE OR REPLACE FUNCTION workflow_db_why_step(step uuid) RETURNS TABLE (reason text, detail text)
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
    signal_sent timestamptz;
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
    -- A wait step waits for its time or its signal, nothing else (no queue, no key).
    IF s.node_type = 'workflow_db.timer' THEN
        RETURN QUERY SELECT 'timer', CASE
            WHEN s.upstream_pending > 0 THEN
                format('then waits %s', coalesce('until ' || s.wait_until::text, (s.wait_seconds * interval '1 second')::text))
            WHEN s.wake_at IS NULL THEN 'the timer is not armed (db-check reports it)'
            WHEN s.wake_at > now() THEN format('the timer fires at %s', s.wake_at)
            ELSE format('the timer was due at %s; the maintenance loop fires it (engine::fire_due_waits)', s.wake_at) END;
        RETURN;
    ELSIF s.node_type = 'workflow_db.signal' THEN
        SELECT g.sent_at INTO signal_sent FROM execution_signals g
         WHERE g.execution_id = s.execution_id AND g.name = s.wait_signal AND g.delivered_to IS NULL
         ORDER BY g.sent_at, g.id LIMIT 1;
        RETURN QUERY SELECT 'signal', CASE
            WHEN signal_sent IS NOT NULL AND s.upstream_pending = 0 THEN
                format('signal %L arrived at %s; the maintenance loop delivers it (engine::fire_due_waits)',
                       s.wait_signal, signal_sent)
            WHEN signal_sent IS NOT NULL THEN
                format('signal %L arrived at %s and is kept until the step is reached', s.wait_signal, signal_sent)
            WHEN s.upstream_pending > 0 THEN
                format('then waits for signal %L', s.wait_signal)
                    || coalesce(format(' (timeout %s)', s.wait_seconds * interval '1 second'), '')
            ELSE format('waits for signal %L', s.wait_signal)
                    || coalesce(format(' until %s, then fails', s.wait_until), '') END;
        RETURN;
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
COMMENT ON FUNCTION workflow_db_why_step(uuid) IS 'What a step waits for, one row per reason (reason code, detail): its execution (final, delayed, not started, paused), upstream steps, a retry backoff or run_after, a timer or a signal, its concurrency key, its queue (paused, full); ''claimable'' when nothing holds it back, ''running''/''finished'' otherwise.';

