-- Rollback: data migration 0012
-- Rolling back version: 0012
--
-- 1. Clear the early-warning scores: nothing writes the column at version 11, so every
--    value is 0012's. (Rolling back 0011 then drops the column.)
-- 2. Clear the MRNs 0012 derived from legacy ids: rows whose patient_id is a legacy
--    old_id (so it differs from the MRN) and whose patient_mrn is that patient's MRN.
--    Rows whose patient_id is the MRN itself (firmware-written or from 0005) are kept.
-- One statement each over the whole table: a rollback is not batched.

UPDATE vitals
SET early_warning_score = NULL
WHERE early_warning_score IS NOT NULL;

UPDATE vitals
SET patient_mrn = NULL
WHERE patient_mrn IS NOT NULL
  AND patient_id IS NOT NULL
  AND patient_id <> patient_mrn
  AND patient_mrn = (SELECT patients.mrn FROM patients WHERE patients.old_id = vitals.patient_id);
