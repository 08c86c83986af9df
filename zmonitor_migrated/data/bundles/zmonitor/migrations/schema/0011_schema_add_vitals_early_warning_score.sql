-- Migration: Early-warning score on vitals, and the legacy-id lookup index
-- Version: 0011
-- Description: schema half of the batched backfill 0012 (seed section 9: don't mix).
--   early_warning_score: aggregate NEWS2 sub-score of the five parameters the monitor
--   measures (respiration rate, SpO2 scale 1, systolic BP, heart rate, temperature);
--   consciousness and supplemental oxygen are not recorded, so the score is partial.
--   idx_patients_old_id: 0012 looks up patients by legacy id once per vitals row.

ALTER TABLE vitals ADD COLUMN early_warning_score INTEGER NULL;

CREATE UNIQUE INDEX idx_patients_old_id ON patients(old_id) WHERE old_id IS NOT NULL;
