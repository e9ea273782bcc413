ALTER TABLE execution_steps DROP COLUMN reclaims;
