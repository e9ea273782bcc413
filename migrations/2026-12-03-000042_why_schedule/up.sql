-- "Why is it not running?" for a schedule (issue 12): by name or id, one
-- row per reason: not_found, schedule_paused (with the error that paused
-- it), schedule_due (a tick is due: the maintenance loop fires it), or
-- schedule_next (when the next tick comes). The cron expression is
-- evaluated in Rust (croner); next_fire_at is the schedule's own next tick.
CREATE FUNCTION workflow_db_why_schedule(schedule text) RETURNS TABLE (reason text, detail text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s schedules;
BEGIN
    SELECT * INTO s FROM schedules x WHERE x.name = schedule OR x.id::text = lower(schedule)
     ORDER BY x.name = schedule DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', format('no schedule named %L', schedule);
        RETURN;
    END IF;
    IF s.paused THEN
        RETURN QUERY SELECT 'schedule_paused', format('schedule %s is paused%s (engine::resume_schedule fires it from the next tick after the resume)',
                                                       s.name, coalesce(': ' || s.last_error, ''));
    ELSIF s.next_fire_at <= now() THEN
        RETURN QUERY SELECT 'schedule_due', format('tick %s of schedule %s is due; the maintenance loop fires it (engine::fire_due_schedules)',
                                                    s.next_fire_at, s.name);
    ELSE
        RETURN QUERY SELECT 'schedule_next', format('schedule %s (%s, %s) fires next at %s%s', s.name, s.cron, s.time_zone,
                                                     s.next_fire_at, coalesce('; last fired for ' || s.last_fired_at::text, ''));
    END IF;
END;
$$;
COMMENT ON FUNCTION workflow_db_why_schedule(text) IS 'What a schedule (by name or id) waits for: not_found, schedule_paused (with its last_error), schedule_due, or schedule_next (its next tick).';
