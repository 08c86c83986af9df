-- Rollback: remove the default alarm thresholds 0014 inserted
-- Rolling back version: 0014
-- Only rows still equal to the shipped defaults go; thresholds a clinician adjusted
-- (or that existed before 0014 with other values) are kept. IS compares NULLs.

BEGIN TRANSACTION;

DELETE FROM alarm_thresholds
WHERE (parameter = 'heart_rate' AND low_critical IS 40 AND low_warning IS 50
       AND high_warning IS 120 AND high_critical IS 150)
   OR (parameter = 'spo2' AND low_critical IS 88 AND low_warning IS 92
       AND high_warning IS NULL AND high_critical IS NULL)
   OR (parameter = 'respiration_rate' AND low_critical IS 8 AND low_warning IS 10
       AND high_warning IS 25 AND high_critical IS 30)
   OR (parameter = 'temperature' AND low_critical IS 35.0 AND low_warning IS 36.0
       AND high_warning IS 38.0 AND high_critical IS 39.0)
   OR (parameter = 'blood_pressure_systolic' AND low_critical IS 80 AND low_warning IS 90
       AND high_warning IS 160 AND high_critical IS 180);

DELETE FROM schema_version WHERE version = 14;

COMMIT;
