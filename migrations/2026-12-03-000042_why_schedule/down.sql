DROP FUNCTION workflow_db_why_schedule(text);
