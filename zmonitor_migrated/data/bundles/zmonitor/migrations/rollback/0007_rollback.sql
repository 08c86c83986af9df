-- Rollback: data migration 0007 (device label backfill)
-- Rolling back version: 0007
--
-- Deliberately changes nothing. 0007 only filled NULL device_label values, a nullable
-- column that exists at version 6, with labels derived from device_id; version-6 code
-- displays them like any other label. Clearing them is NOT safe: a label the firmware
-- wrote itself ('DEVICE-042' for 'SERIAL-042') cannot be told apart from a backfilled
-- one, and re-applying 0007 only touches NULL labels.

BEGIN TRANSACTION;

DELETE FROM schema_version WHERE version = 7;

COMMIT;
