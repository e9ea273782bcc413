DROP TABLE schedules;
DROP FUNCTION workflow_db_schedules_check_time_zone();
