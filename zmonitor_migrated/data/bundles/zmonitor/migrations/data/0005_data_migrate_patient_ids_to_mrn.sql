-- Data Migration: Convert old patient_id to new patient_mrn format
-- Version: 0005
-- Risk: HIGH - touches all vitals records
-- Estimated time: 5-10 minutes for 1M records
--
-- Firmware before 0005 wrote the patient's MRN into vitals.patient_id; this copies it
-- into patient_mrn where it names a known patient. Rows written by the legacy firmware
-- carry the numeric patients.old_id instead; 0012 maps those (batched).
-- Pre-check (seed step 1, run by the operator; the runner ignores SELECT results):
--   SELECT COUNT(*) FROM vitals WHERE patient_id IS NULL;   -- expected 0

BEGIN TRANSACTION;

UPDATE vitals
SET patient_mrn = (
    SELECT patients.mrn
    FROM patients
    WHERE patients.mrn = vitals.patient_id
)
WHERE patient_mrn IS NULL
  AND patient_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM patients WHERE patients.mrn = vitals.patient_id);

INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (5, datetime('now'), 'Migrate patient_id to patient_mrn', 'data');

COMMIT;

-- Post-migration validation (checks/post.yaml runs the full set after the last migration):
-- SELECT COUNT(*) FROM vitals WHERE patient_mrn IS NULL AND patient_id IN (SELECT mrn FROM patients);
