DROP TABLE execution_steps;
