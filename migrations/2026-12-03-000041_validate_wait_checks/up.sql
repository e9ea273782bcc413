-- Validate the rules 000039 added NOT VALID (no existing row has a wait
-- column, and no queue is named workflow_db.*). VALIDATE takes only a SHARE
-- UPDATE EXCLUSIVE lock: reads and writes go on while it scans.
ALTER TABLE execution_steps VALIDATE CONSTRAINT execution_steps_wait_check;
ALTER TABLE queues VALIDATE CONSTRAINT queues_reserved_name;
