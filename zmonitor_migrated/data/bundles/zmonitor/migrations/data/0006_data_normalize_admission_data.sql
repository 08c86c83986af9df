-- Data Migration: Normalize admission data into admission_events table
-- Version: 0006
-- Risk: MEDIUM - creates new records, doesn't modify existing
--
-- Every inserted event carries notes = 'Migrated from patients table' (the rollback
-- deletes exactly those) and is skipped if an event with the same patient and
-- timestamp already exists (re-running after a rollback adds no duplicates).

BEGIN TRANSACTION;

-- Insert historical admission events from patients table
INSERT INTO admission_events (
    event_type,
    timestamp,
    patient_mrn,
    device_id,
    device_label,
    user_id,
    bed_location,
    source,
    notes,
    created_at
)
SELECT
    'ADMISSION' as event_type,
    admitted_at as timestamp,
    mrn as patient_mrn,
    NULL as device_id,      -- Historical data may not have this
    NULL as device_label,
    NULL as user_id,        -- Historical data may not have this
    bed_location,
    admission_source as source,
    'Migrated from patients table' as notes,
    datetime('now') as created_at
FROM patients
WHERE admitted_at IS NOT NULL
  AND admission_status = 'ADMITTED'
  AND NOT EXISTS (
      -- Don't duplicate if already migrated
      SELECT 1 FROM admission_events ae
      WHERE ae.patient_mrn = patients.mrn
        AND ae.timestamp = patients.admitted_at
  );

-- Insert discharge events for patients who were discharged
INSERT INTO admission_events (
    event_type,
    timestamp,
    patient_mrn,
    device_id,
    device_label,
    user_id,
    bed_location,
    source,
    notes,
    created_at
)
SELECT
    'DISCHARGE' as event_type,
    discharged_at as timestamp,
    mrn as patient_mrn,
    NULL as device_id,
    NULL as device_label,
    NULL as user_id,
    bed_location,
    'Manual' as source,
    'Migrated from patients table' as notes,
    datetime('now') as created_at
FROM patients
WHERE discharged_at IS NOT NULL
  AND admission_status = 'DISCHARGED'
  AND NOT EXISTS (
      SELECT 1 FROM admission_events ae
      WHERE ae.patient_mrn = patients.mrn
        AND ae.timestamp = patients.discharged_at
  );

-- Verify migration (operator query; the runner ignores SELECT results):
-- SELECT event_type, COUNT(*) FROM admission_events
--  WHERE notes LIKE '%Migrated%' GROUP BY event_type;

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (6, datetime('now'), 'Normalize admission data into admission_events', 'data');

COMMIT;
