-- Validate the lease rule 000015 added NOT VALID (000015 brought existing rows
-- in line first). VALIDATE takes only a SHARE UPDATE EXCLUSIVE lock: reads and
-- writes go on while it scans.
ALTER TABLE execution_steps VALIDATE CONSTRAINT execution_steps_lease_check;
