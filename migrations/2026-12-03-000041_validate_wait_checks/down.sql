-- A constraint cannot be marked NOT VALID again; re-create both as 000039 left them.
ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_wait_check;
ALTER TABLE queues DROP CONSTRAINT queues_reserved_name;
ALTER TABLE execution_steps ADD CONSTRAINT execution_steps_wait_check CHECK (
    CASE WHEN node_type IN ('workflow_db.timer', 'workflow_db.signal')
         THEN queue IS NULL AND concurrency_key IS NULL
              AND (wait_signal IS NULL OR node_type = 'workflow_db.signal')
         ELSE wait_seconds IS NULL AND wait_until IS NULL AND wait_signal IS NULL AND wake_at IS NULL
              AND NOT starts_with(workflow_db_step_queue(queue, node_type), 'workflow_db.') END) NOT VALID;
COMMENT ON CONSTRAINT execution_steps_wait_check ON execution_steps IS 'Wait steps (workflow_db.timer, workflow_db.signal) have no queue and no concurrency key of their own; other steps have no wait columns and no queue in the engine''s namespace workflow_db.*.';

ALTER TABLE queues ADD CONSTRAINT queues_reserved_name CHECK (NOT starts_with(name, 'workflow_db.')) NOT VALID;
COMMENT ON CONSTRAINT queues_reserved_name ON queues IS 'Queues named workflow_db.* are the engine''s own (timers, signals): they cannot be paused or limited (pause their executions instead).';
