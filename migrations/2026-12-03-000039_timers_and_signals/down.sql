-- Restores 000038's schema.
DROP TRIGGER execution_signals_sent ON execution_signals;
DROP FUNCTION workflow_db_signals_sent();
DROP TRIGGER execution_steps_wait_arm ON execution_steps;
DROP FUNCTION workflow_db_step_arm_wait();
DROP TRIGGER execution_steps_wait_setup ON execution_steps;
DROP FUNCTION workflow_db_steps_wait_setup();
DROP FUNCTION workflow_db_wait_configs(uuid[]);
DROP FUNCTION workflow_db_wait_config_error(text, jsonb);
DROP FUNCTION workflow_db_wait_armed(uuid, text, interval, timestamptz, timestamptz);
DROP TABLE execution_signals;
ALTER TABLE queues DROP CONSTRAINT queues_reserved_name;
ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_wait_check;
ALTER TABLE execution_steps
    DROP COLUMN wait_seconds,
    DROP COLUMN wait_until,
    DROP COLUMN wait_signal,
    DROP COLUMN wake_at;

-- workflow_db_why_step as 000035 left it.
-- What a step waits for: one row per reason, in the order they apply.
-- Codes: not_found, finished, running, execution_final, delayed_start,
-- execution_pending, execution_paused, upstream, retry_backoff, scheduled,
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

