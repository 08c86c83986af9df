-- Rollback: data migration 0005 (patient_id -> patient_mrn)
-- Rolling back version: 0005
--
-- Deliberately changes nothing. 0005 only filled vitals.patient_mrn, a nullable column
-- that already exists at version 4, with a copy of patient_id; version-4 code reads
-- patient_id, which 0005 never touched, so the copied values are harmless there and
-- re-applying 0005 skips them (WHERE patient_mrn IS NULL).
-- Clearing them is NOT safe: rows whose firmware wrote patient_mrn itself look exactly
-- the same (patient_mrn = patient_id), and clearing would destroy that data.
-- (The seed's rollback, "SET patient_id = patient_mrn WHERE patient_id IS NULL", writes
-- rows 0005 never touched; we do not carry it over.)

BEGIN TRANSACTION;

DELETE FROM schema_version WHERE version = 5;

COMMIT;
