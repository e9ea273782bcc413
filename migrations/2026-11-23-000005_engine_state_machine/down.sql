DROP TRIGGER execution_steps_status_transitioned ON execution_steps;
DROP FUNCTION workflow_db_step_transitioned();
DROP TRIGGER execution_steps_status_transition ON execution_steps;
DROP FUNCTION workflow_db_step_transition();
DROP TRIGGER executions_status_transitioned ON executions;
DROP FUNCTION workflow_db_execution_transitioned();
DROP TRIGGER executions_status_transition ON executions;
DROP FUNCTION workflow_db_execution_transition();
DROP FUNCTION workflow_db_settle_execution(uuid);

DROP TABLE execution_events;
DROP FUNCTION workflow_db_events_append_only();

ALTER TABLE execution_steps DROP CONSTRAINT execution_steps_counters_check;
ALTER TABLE execution_steps DROP COLUMN locked_until;
ALTER TABLE execution_steps DROP COLUMN locked_by;
ALTER TABLE execution_steps DROP COLUMN run_after;
ALTER TABLE execution_steps DROP COLUMN max_retries;
ALTER TABLE execution_steps DROP COLUMN downstream;
ALTER TABLE execution_steps DROP COLUMN upstream_pending;

ALTER TABLE executions DROP CONSTRAINT executions_parent_execution_id_fkey;
ALTER TABLE executions DROP COLUMN parent_execution_id;
ALTER TABLE executions DROP COLUMN idempotency_key;
ALTER TABLE executions DROP COLUMN workflow_version;

DROP TRIGGER workflows_bump_version ON workflows;
DROP FUNCTION workflow_db_bump_version();
ALTER TABLE workflows DROP COLUMN version;
