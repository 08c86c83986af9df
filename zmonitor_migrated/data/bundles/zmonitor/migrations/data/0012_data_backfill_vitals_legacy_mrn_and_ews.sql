-- zmonitor:batch table=vitals size=10000
-- Data Migration: map legacy patient ids to MRNs, compute the early-warning score
-- Version: 0012
-- Risk: HIGH - touches every vitals row; batched (seed section 11)
-- Estimated time: about a minute per million rows on the bedside unit
--
-- The runner walks vitals by rowid ranges of 10000 (:batch_start..:batch_end), one
-- transaction per range, and records the last finished range in the same transaction,
-- so a power cut resumes where it stopped. Unlike the seed's
-- "WHERE patient_mrn IS NULL LIMIT 10000" loop this always makes progress: a row whose
-- legacy id matches no patient keeps patient_mrn NULL and the walk moves on.
-- No BEGIN/COMMIT here: the runner commits per batch.

-- 1. Legacy firmware wrote the numeric patients.old_id (as text) into patient_id and no
--    MRN. patients.old_id is INTEGER, so the comparison converts patient_id to a number;
--    MRN-shaped ids never match. idx_patients_old_id (0011) serves the lookup.
UPDATE vitals
SET patient_mrn = (
    SELECT patients.mrn FROM patients WHERE patients.old_id = vitals.patient_id
)
WHERE rowid BETWEEN :batch_start AND :batch_end
  AND patient_mrn IS NULL
  AND patient_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM patients WHERE patients.old_id = vitals.patient_id);

-- 2. Partial NEWS2 (Royal College of Physicians, 2017) from the five measured parameters;
--    rows missing any of them keep NULL.
UPDATE vitals
SET early_warning_score =
      (CASE WHEN respiration_rate <= 8 THEN 3
            WHEN respiration_rate <= 11 THEN 1
            WHEN respiration_rate <= 20 THEN 0
            WHEN respiration_rate <= 24 THEN 2
            ELSE 3 END)
    + (CASE WHEN spo2 <= 91 THEN 3
            WHEN spo2 <= 93 THEN 2
            WHEN spo2 <= 95 THEN 1
            ELSE 0 END)
    + (CASE WHEN blood_pressure_systolic <= 90 THEN 3
            WHEN blood_pressure_systolic <= 100 THEN 2
            WHEN blood_pressure_systolic <= 110 THEN 1
            WHEN blood_pressure_systolic <= 219 THEN 0
            ELSE 3 END)
    + (CASE WHEN heart_rate <= 40 THEN 3
            WHEN heart_rate <= 50 THEN 1
            WHEN heart_rate <= 90 THEN 0
            WHEN heart_rate <= 110 THEN 1
            WHEN heart_rate <= 130 THEN 2
            ELSE 3 END)
    + (CASE WHEN temperature <= 35.0 THEN 3
            WHEN temperature <= 36.0 THEN 1
            WHEN temperature <= 38.0 THEN 0
            WHEN temperature <= 39.0 THEN 1
            ELSE 2 END)
WHERE rowid BETWEEN :batch_start AND :batch_end
  AND early_warning_score IS NULL
  AND respiration_rate IS NOT NULL
  AND spo2 IS NOT NULL
  AND blood_pressure_systolic IS NOT NULL
  AND heart_rate IS NOT NULL
  AND temperature IS NOT NULL;
