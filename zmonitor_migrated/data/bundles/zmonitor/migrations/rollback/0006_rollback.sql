-- Rollback: remove the admission events 0006 derived from patients
-- Rolling back version: 0006
-- Events recorded by the application carry other notes and are kept; the patients
-- columns 0006 read from were never modified.

BEGIN TRANSACTION;

DELETE FROM admission_events
WHERE notes = 'Migrated from patients table';

DELETE FROM schema_version WHERE version = 6;

COMMIT;
