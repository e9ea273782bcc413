-- Validate the throttle rule 000025 added NOT VALID (every existing row has
-- throttled = false). VALIDATE takes only a SHARE UPDATE EXCLUSIVE lock:
-- reads and writes go on while it scans.
ALTER TABLE execution_steps VALIDATE CONSTRAINT execution_steps_throttle_check;
