-- Rollback: remove alarm_history
-- Rolling back version: 0008
-- Alarms archived after 0008 are lost with the table: version 7 has nowhere to keep
-- them (the live alarms table is untouched). Take the pre-rollback backup if they matter.

BEGIN TRANSACTION;

DROP TABLE alarm_history;

DELETE FROM schema_version WHERE version = 8;

COMMIT;
