-- workflow_db_executions_transitioned as 000035 left it.
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
