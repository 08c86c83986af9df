-- Rollback: remove the early-warning score column and the legacy-id index
-- Rolling back version: 0011
-- early_warning_score is derived from the other vitals columns (0012 recomputes it).

DROP INDEX idx_patients_old_id;

ALTER TABLE vitals DROP COLUMN early_warning_score;
