-- Why, for a signal wait without a timeout: format() turns a NULL argument
-- into an empty string (not NULL), so 000039's coalesce never applied and the
-- detail read "until , then fails" / "(timeout )". Now "(no timeout)".
-- The function is 000039's otherwise.
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
                    || CASE WHEN s.wait_seconds IS NULL THEN ' (no timeout)'
                            ELSE format(' (timeout %s)', s.wait_seconds * interval '1 second') END
            ELSE format('waits for signal %L', s.wait_signal)
                    || CASE WHEN s.wait_until IS NULL THEN ' (no timeout)'
                            ELSE format(' until %s, then fails', s.wait_until) END END;
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
