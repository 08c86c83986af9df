-- Rollback: remove the initial schema (back to an empty database)
-- Rolling back version: 0001
-- Destroys every row: version 0 has no tables. Children first.
-- zmonitor:allow rebuild-with-children

BEGIN TRANSACTION;

DROP TABLE alarms;
DROP TABLE vitals;
DROP TABLE settings;
DROP TABLE alarm_thresholds;
DROP TABLE patients;

DELETE FROM schema_version WHERE version = 1;

COMMIT;
