DROP FUNCTION workflow_db_set_updated_at();
DROP TYPE step_status;
DROP TYPE execution_status;
